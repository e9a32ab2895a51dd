"""Verified manifests: a changed data file is named, never silently used or retrained on; byte-identical upstream
output retrains nothing (timings, module order and other records stay out of the fingerprints)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_project
from persllm import pipeline
from persllm.config import load_project
from persllm.errors import DataError
from persllm.progress import Progress
from persllm.workspace import Workspace, content_digest, write_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # module-wide, see conftest
SMALL = ["teacher=fake", "construct.mode=grounded", "construct.questions_per_passage=1",
         "construct.general_per_stage=1", "sft.batch_size=2", "sft.max_steps=2", "sft.save_steps=1",
         "dpo.batch_size=2", "dpo.max_steps=1", "eval.models=[base,sft]", "eval.max_new_tokens=4",
         "eval.max_probes=4", "eval.heldout_questions=1", "eval.judge_items=0", "eval.ipip=false",
         "eval.ipip_interview_items=0", "eval.batch_size=8"]


class Notes(Progress):
    """Keeps the one-line notes a run gives the user."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A project whose five stages all ran once (copied by each test, so every test starts from the same state)."""
    root = write_project(tmp_path_factory.mktemp("manifests") / "person")
    pipeline.run(load_project(root, overrides=[f"base_model=hf:{tiny_model}", *SMALL]))
    return root


def copy(finished: Path, tmp_path: Path, tiny_model: Path, *extra: str) -> tuple[Path, object]:
    root = shutil.copytree(finished, tmp_path / "person", symlinks=True)
    return root, load_project(root, overrides=[f"base_model=hf:{tiny_model}", *SMALL, *extra])


def statuses(outcomes: list[pipeline.StageOutcome]) -> dict[str, str]:
    return {o.stage: "skipped" if o.skipped else "done" for o in outcomes}


def test_a_copied_finished_project_is_up_to_date(finished: Path, tmp_path: Path, tiny_model: Path) -> None:
    _, project = copy(finished, tmp_path, tiny_model)
    assert set(statuses(pipeline.run(project)).values()) == {"skipped"}


def test_rebuilding_byte_identical_construct_output_trains_nothing(finished: Path, tmp_path: Path, tiny_model: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root, project = copy(finished, tmp_path, tiny_model)
    samples = (root / "out" / "construct" / "samples.jsonl").read_bytes()
    spec = pipeline.STAGE_SPECS["construct"]
    # the wall-clock figures of a real run, made certain to differ from the first run's
    timed = dataclasses.replace(spec, run=lambda *a: spec.run(*a) | {"seconds": time.time(), "rerun": True})
    monkeypatch.setitem(pipeline.STAGE_SPECS, "construct", timed)
    shutil.rmtree(root / "out" / "construct")
    outcomes = pipeline.run(project)
    assert statuses(outcomes) == {"ingest": "skipped", "construct": "done", "sft": "skipped", "dpo": "skipped",
                                  "eval": "skipped"}
    assert (root / "out" / "construct" / "samples.jsonl").read_bytes() == samples
    assert json.loads((root / "out" / "construct" / "stats.json").read_text())["rerun"] is True


def test_a_corrupted_line_of_samples_stops_the_run_naming_the_file(finished: Path, tmp_path: Path,
                                                                    tiny_model: Path) -> None:
    root, project = copy(finished, tmp_path, tiny_model)
    path = root / "out" / "construct" / "samples.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = lines[1].replace('"', "'", 1)  # one byte of one line: same size, broken JSON
    path.write_text("".join(lines), encoding="utf-8")
    corrupted = path.read_bytes()
    with pytest.raises(DataError, match=r"construct/samples\.jsonl \(.* bytes when construct finished") as info:
        pipeline.run(project)
    assert "on_changed_output=rerun" in str(info.value) and "Nothing was overwritten" in str(info.value)
    assert path.read_bytes() == corrupted  # the user's file is left as it is
    assert Workspace(root / "out").manifest("construct") is not None


def test_on_changed_output_rerun_redoes_the_stage_and_says_why(finished: Path, tmp_path: Path,
                                                                tiny_model: Path) -> None:
    root, project = copy(finished, tmp_path, tiny_model, "on_changed_output=rerun")
    path = root / "out" / "construct" / "samples.jsonl"
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    notes = Notes()
    outcomes = pipeline.run(project, progress=notes)
    assert statuses(outcomes)["construct"] == "done" and statuses(outcomes)["sft"] == "skipped"
    assert any("construct/samples.jsonl" in n and "redoing construct" in n for n in notes.notes), notes.notes
    assert path.read_bytes() == original


def test_a_truncated_adapter_is_named_by_the_next_run(finished: Path, tmp_path: Path, tiny_model: Path) -> None:
    root, _ = copy(finished, tmp_path, tiny_model)
    adapter = root / "out" / "sft" / "adapter" / "adapter_model.safetensors"
    size = adapter.stat().st_size
    with open(adapter, "r+b") as fh:
        fh.truncate(size // 2)
    sets = [a for s in [f"base_model=hf:{tiny_model}", *SMALL] for a in ("--set", s)]
    result = subprocess.run([sys.executable, "-m", "persllm", "run", str(root), *sets], capture_output=True,
                            text=True, check=False, timeout=300, env=dict(os.environ, COLUMNS="400"))
    assert result.returncode == 1, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert f"sft/adapter/adapter_model.safetensors ({size:,} bytes when sft finished, {size // 2:,} now)" in message
    assert adapter.stat().st_size == size // 2


def test_a_changed_upstream_outside_the_run_is_named(finished: Path, tmp_path: Path, tiny_model: Path) -> None:
    """`persllm train --only dpo` reads sft without running it: a changed sft adapter is an error, not stale data."""
    root, project = copy(finished, tmp_path, tiny_model, "on_changed_output=rerun")
    (root / "out" / "sft" / "adapter" / "adapter_config.json").write_text("{}\n")
    with pytest.raises(DataError, match=r"stage 'dpo' reads the output of 'sft', but .*sft/adapter/adapter_config"):
        pipeline.run(project, ["ingest", "construct", "dpo"], force=["dpo"])


def test_records_are_neither_verified_nor_fingerprinted(finished: Path, tmp_path: Path, tiny_model: Path) -> None:
    """Stats, curves and the audit page describe a run; editing them (`persllm inspect` rewrites audit.html) is no
    reason to stop or retrain."""
    root, project = copy(finished, tmp_path, tiny_model)
    out = root / "out"
    write_json(out / "construct" / "stats.json", {"edited": True})
    (out / "construct" / "audit.html").write_text("<p>audit</p>")
    (out / "sft" / "curves.png").write_bytes(b"not a png")
    (out / "sft" / "metrics.jsonl").unlink()
    assert set(statuses(pipeline.run(project)).values()) == {"skipped"}


def test_the_digest_covers_content_not_records_or_module_order(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "out")
    adapter = ws.stage_dir("sft") / "adapter"
    adapter.mkdir(parents=True)
    modules = [f"model.layers.{i}.{m}" for i in range(2) for m in ("q_proj", "v_proj", "mlp.up_proj")]
    config = {"r": 16, "target_modules": modules, "peft_type": "LORA"}
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    write_json(adapter / "adapter_config.json", config)
    first = ws.finish("sft", "fp", {"seconds": 1.0})
    # another process: PEFT's set of modules in another order, keys in another order, other timings
    write_json(adapter / "adapter_config.json", {"peft_type": "LORA", "target_modules": modules[::-1], "r": 16})
    second = ws.finish("sft", "fp", {"seconds": 2.5})
    assert first.outputs != second.outputs and first.digest == second.digest
    assert ws.manifest("sft") == second and not ws.changed(second)
    write_json(adapter / "adapter_config.json", config | {"r": 8})
    assert ws.changed(second) == ["adapter/adapter_config.json"]
    assert content_digest(ws.stage_dir("sft"), ["adapter/adapter_config.json"]) != content_digest(
        ws.stage_dir("sft"), ["adapter/adapter_model.safetensors"])
    assert ws.finish("sft", "fp").digest != first.digest


def test_manifests_written_before_verification_keep_their_digest(tmp_path: Path) -> None:
    """An upgrade must not retrain finished work: a manifest without a recorded digest keeps the old one."""
    ws = Workspace(tmp_path / "out")
    ws.stage_dir("construct").mkdir(parents=True)
    (ws.stage_dir("construct") / "samples.jsonl").write_text("{}\n")
    outputs = {"samples.jsonl": hashlib.sha256(b"{}\n").hexdigest()}
    write_json(ws.stage_dir("construct") / "manifest.json",
               {"stage": "construct", "fingerprint": "fp", "outputs": outputs, "finished_at": 0})
    manifest = ws.manifest("construct")
    assert manifest is not None and not ws.changed(manifest)
    assert manifest.digest == hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()
