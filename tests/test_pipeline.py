"""`persllm run` end to end on a tiny model with an HTTP teacher: 1-, 2- and 3-stage personas, skipping and redoing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import KNOWLEDGE, STYLE, write_project
from persllm.backends.fakeserver import FakeServer

THIRD = {
    "knowledge": ["In 1945 Test Person returned to Graz and taught engineering to war widows at a night school.",
                  "She wrote a textbook on small hydroelectric plants in 1948 that was used for twenty years.",
                  "Her son Peter became a physician in Vienna in 1950."],
    "style": ["I am old enough now to say what I think, and I think most meetings should be shorter.",
              "Teaching widows to wire a dynamo gave me more joy than any prize ever did.",
              "The river still turns the wheels, whatever the men in uniforms decide."],
}
STAGE_YAML = """\
  - id: {id}
    label: "{label}"
    description: {description}
    knowledge: {id}_knowledge.txt
    style: {id}_style.txt
"""
STAGES = [("early", "1900", "A young engineer in Vienna."), ("late", "1930", "A famous inventor in Berlin."),
          ("old", "1950", "A retired teacher in Graz.")]
SMALL = ["construct.questions_per_passage=1", "construct.general_per_stage=1", "sft.batch_size=2",
         "sft.max_steps=2", "sft.save_steps=1", "dpo.batch_size=2", "dpo.max_steps=2", "eval.max_new_tokens=6",
         "eval.max_probes=6", "eval.heldout_questions=2", "eval.judge_items=1", "eval.judge_repeats=1",
         "eval.judge_retries=0", "eval.ipip_interview_items=0", "eval.batch_size=8"]


def persona(root: Path, n_stages: int) -> Path:
    """A test persona with the first `n_stages` stages."""
    chosen = STAGES[:n_stages]
    text = "name: Test Person\nlanguage: en\nstages:\n" + "".join(
        STAGE_YAML.format(id=i, label=label, description=d) for i, label, d in chosen)
    knowledge = {**KNOWLEDGE, "old": THIRD["knowledge"]}
    style = {**STYLE, "old": THIRD["style"]}
    ids = [c[0] for c in chosen]
    return write_project(root, text, {k: v for k, v in knowledge.items() if k in ids},
                         {k: v for k, v in style.items() if k in ids})


def persllm_run(root: Path, url: str, model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [f"teacher=openai:scripted@{url}", f"base_model=hf:{model}", *SMALL, *extra]
    sets = [a for s in args for a in ("--set", s)]
    result = subprocess.run([sys.executable, "-m", "persllm", "run", str(root), *sets], capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def status(output: str) -> dict[str, str]:
    """stage -> 'done' or 'skipped' from the run summary table."""
    found: dict[str, str] = {}
    summary = output.split("Summary", 1)[-1].split("Evaluation", 1)[0]
    for line in summary.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
        if len(cells) >= 2 and cells[0] in ("ingest", "construct", "sft", "dpo", "eval"):
            found[cells[0]] = "skipped" if cells[1].startswith("skipped") else cells[1]
    return found


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_run_end_to_end(tmp_path: Path, tiny_model: Path, n_stages: int) -> None:
    root = persona(tmp_path / "p", n_stages)
    with FakeServer() as server:
        first = persllm_run(root, server.url, tiny_model)
        assert status(first.stderr) == dict.fromkeys(("ingest", "construct", "sft", "dpo", "eval"), "done")
        out = root / "out"
        report = json.loads((out / "eval" / "report.json").read_text())
        assert [m["name"] for m in report["models"]] == ["base", "sft", "dpo"]
        assert "Evaluation" in first.stderr and "report.html" in first.stderr
        stages = {json.loads(line)["stage"] for line in (out / "construct" / "samples.jsonl").read_text().splitlines()}
        assert stages == {s[0] for s in STAGES[:n_stages]}
        for stage in ("sft", "dpo"):
            assert (out / stage / "adapter" / "adapter_config.json").is_file()
            assert (out / stage / "config.yaml").is_file() and (out / stage / "manifest.json").is_file()
        if n_stages != 2:
            return
        requests = server.requests
        again = persllm_run(root, server.url, tiny_model)
        assert set(status(again.stderr).values()) == {"skipped"}
        assert server.requests == requests  # nothing was asked of the teacher or the judge again
        shutil.rmtree(out / "eval")
        redo = persllm_run(root, server.url, tiny_model)
        assert status(redo.stderr) == {"ingest": "skipped", "construct": "skipped", "sft": "skipped",
                                       "dpo": "skipped", "eval": "done"}
        # a different eval setting re-runs eval alone; training is untouched
        changed = persllm_run(root, server.url, tiny_model, "eval.max_probes=4")
        assert status(changed.stderr)["eval"] == "done" and status(changed.stderr)["sft"] == "skipped"


def test_eval_of_the_base_model_needs_no_training(tmp_path: Path, tiny_model: Path) -> None:
    root = persona(tmp_path / "p", 2)
    with FakeServer() as server:
        sets = [a for s in [f"teacher=openai:scripted@{server.url}", f"base_model=hf:{tiny_model}", *SMALL]
                for a in ("--set", s)]
        result = subprocess.run([sys.executable, "-m", "persllm", "eval", str(root), "--models", "base,rag", *sets],
                                capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(status(result.stderr)) == {"ingest", "construct", "eval"}
    assert not (root / "out" / "sft").exists()
    report = json.loads((root / "out" / "eval" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "rag"]


def test_failed_smoke_test_is_loud_and_strict_exits_non_zero(tmp_path: Path, tiny_model: Path) -> None:
    """A tiny random model fails its smoke test legitimately: the summary says so on its own line with an example
    answer, and `--strict` turns it into exit code 1 naming the stage and smoke.json (also for skipped stages)."""
    root = persona(tmp_path / "p", 2)
    with FakeServer() as server:
        sets = [a for s in [f"teacher=openai:scripted@{server.url}", f"base_model=hf:{tiny_model}", *SMALL]
                for a in ("--set", s)]

        def train(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "persllm", "train", str(root), "--only", "sft", *extra,
                                   *sets], capture_output=True, text=True, timeout=600, check=False)

        lenient = train()
        strict = train("--strict")
    smoke = json.loads((root / "out" / "sft" / "smoke.json").read_text())
    assert not smoke["ok"] and smoke["problems"]
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    flat = " ".join(lenient.stderr.split())
    assert "SMOKE TEST FAILED (see" in flat  # in the summary row (the table may wrap the cell)
    warning = next(line for line in lenient.stderr.splitlines() if "smoke test FAILED" in line)
    assert warning.startswith("WARNING sft smoke test FAILED: " + ", ".join(smoke["problems"]))
    assert "e.g. " in warning and str(root / "out" / "sft" / "smoke.json") in flat
    assert strict.returncode == 1, strict.stderr[-3000:]
    assert status(strict.stderr)["sft"] == "skipped"
    error = " ".join(strict.stderr.split("Error:", 1)[1].split())
    assert error.startswith("--strict: the generation smoke test failed for sft (")
    assert str(root / "out" / "sft" / "smoke.json") in error
