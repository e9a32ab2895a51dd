"""Faults survived: SIGKILL during training and arena voting, a full disk, malformed projects and material."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import MINIMAL_YAML, free_port, wait_for_http, write_project
from persllm.config import load_project
from persllm.errors import ConfigError, PersllmError
from persllm.pipeline import run
from persllm.workspace import Workspace, write_json, write_jsonl

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _persllm(*args: str) -> list[str]:
    return [sys.executable, "-m", "persllm", *args]


def test_sigkill_during_training_resumes_from_checkpoint(project_dir: Path, tiny_model: Path) -> None:
    args = ["--set", f"base_model=hf:{tiny_model}", "--set", "teacher=fake", "--set", "construct.mode=grounded",
            "--set", "sft.max_steps=40", "--set", "sft.save_steps=5", "--set", "sft.batch_size=1"]
    proc = subprocess.Popen(_persllm("train", str(project_dir), "--only", "sft", *args), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = project_dir / "out" / "sft" / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(ckpts.glob("checkpoint-*/trainer_state.json")):
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed; make it longer")
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project_dir / "out" / "sft" / "manifest.json").exists()
    assert not (project_dir / "out" / "sft" / "adapter").exists()
    resumed = subprocess.run(_persllm("train", str(project_dir), "--only", "sft", *args), env=ENV,
                             capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr
    stats = json.loads((project_dir / "out" / "sft" / "stats.json").read_text())
    assert stats["resumed_from_step"] >= 5 and stats["steps"] == 40
    assert (project_dir / "out" / "sft" / "adapter" / "adapter_model.safetensors").exists()


def test_sigkill_during_arena_voting_loses_no_acknowledged_vote(project_dir: Path, tiny_model: Path,
                                                                tmp_path: Path) -> None:
    project = load_project(project_dir, overrides=["teacher=fake", "construct.mode=grounded",
                                                   f"base_model=hf:{tiny_model}"])
    run(project, ["ingest", "construct"])
    db = tmp_path / "arena.sqlite"
    port = free_port()
    cmd = _persllm("arena", str(project_dir), "--set", "teacher=fake", "--set", "construct.mode=grounded",
                   "--set", f"base_model=hf:{tiny_model}", "--models", "base,fake", "--questions", "4",
                   "--max-tokens", "8", "--db", str(db), "--port", str(port),
                   "--new-voters-per-hour", "100000")  # the voting threads below go through many voters

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=ENV | {"PERSLLM_ARENA_ADMIN_KEY": "faults-key"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if wait_for_http(f"http://127.0.0.1:{port}/health", proc, timeout=240) is not None:
            return proc
        proc.kill()
        pytest.fail("the arena did not start")

    proc = start()
    acknowledged = []
    stop = threading.Event()

    def vote_forever() -> None:
        while not stop.is_set():  # a new voter (cookie) each time one has voted on every question
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                try:
                    while not stop.is_set():
                        ballot = client.get("/api/ballot").json()
                        if "token" not in ballot:
                            break
                        reply = client.post("/vote", json={"token": ballot["token"], "choice": "A", "comment": "ok"})
                        if reply.status_code == 200:
                            acknowledged.append(ballot["token"])
                except (httpx.HTTPError, ValueError, KeyError):
                    return

    voters = [threading.Thread(target=vote_forever) for _ in range(4)]
    for voter in voters:
        voter.start()
    time.sleep(2.0)
    os.kill(proc.pid, signal.SIGKILL)  # mid-vote: some requests are in flight
    proc.wait()
    stop.set()
    for voter in voters:
        voter.join(timeout=10)
    assert len(acknowledged) >= 5
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in conn.execute("SELECT token FROM votes")}
    assert set(acknowledged) <= stored  # every vote the server confirmed survived the kill
    proc = start()  # and the arena comes back on the same database
    try:
        results = httpx.get(f"http://127.0.0.1:{port}/api/results", params={"key": "faults-key"}, timeout=10).json()
        assert results["votes"] == len(stored)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_disk_full_gives_a_clear_error_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.jsonl"
    write_jsonl(target, [{"a": 1}])
    before = target.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(PersllmError, match="no space left on the device while writing .*data.jsonl"):
        write_jsonl(target, [{"a": i} for i in range(1000)])
    with pytest.raises(PersllmError, match="no space left"):
        write_json(tmp_path / "new.json", {"x": 1})
    assert target.read_bytes() == before  # the old file is intact, not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no temp files left behind


def test_disk_full_during_a_stage_leaves_no_manifest(project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = load_project(project_dir, overrides=["teacher=fake", "construct.mode=grounded"])
    run(project, ["ingest"])
    ws = Workspace.of(project)
    passages = (ws.stage_dir("ingest") / "passages.jsonl").read_bytes()
    (project_dir / "late_style.txt").write_text((project_dir / "late_style.txt").read_text() + "A new line of mine.\n")

    real_fsync, calls = os.fsync, []

    def full_after_first(fd: int) -> None:  # config.resolved.yaml is written, then the disk fills up
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_first)
    with pytest.raises(PersllmError, match="no space left"):
        run(project, ["ingest"])
    monkeypatch.undo()
    assert ws.manifest("ingest") is None  # the stage is not marked done...
    assert (ws.stage_dir("ingest") / "passages.jsonl").read_bytes() == passages  # ...and its old output is intact
    assert not run(project, ["ingest"])[0].skipped  # so the next run redoes it


@pytest.mark.parametrize(("text", "expected"), [
    ("name: [unclosed\nstages: []\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("name: X\nstages:\n\t- id: a\n", "not valid YAML"),
    ("name: X\nstages: notalist\n", "stages: expected a list"),
    ("name: X\nstages:\n  - 42\n", "stages[0]: expected a mapping"),
])
def test_malformed_persona_yaml(tmp_path: Path, text: str, expected: str) -> None:
    root = write_project(tmp_path / "p")
    (root / "persona.yaml").write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_project(root)


def test_huge_single_line_is_split_not_choked_on(tmp_path: Path) -> None:
    huge = "".join(f"She measured the radioactivity of sample {i} in the cold shed again and again. "
                   for i in range(20_000))  # ~1.6 MB on one line
    root = write_project(tmp_path / "p", knowledge={"early": [huge], "late": ["In 1921 she founded a company."]})
    project = load_project(root)
    started = time.monotonic()
    outcome = run(project, ["ingest"])[0]
    assert time.monotonic() - started < 60
    assert outcome.stats["split_paragraphs"] > 100
    rows = [json.loads(x) for x in (project.output / "ingest" / "passages.jsonl").read_text().splitlines()]
    assert max(len(r["text"]) for r in rows) < 5_000 and all(r["line"] == 1 for r in rows if r["stage"] == "early"
                                                              and r["kind"] == "knowledge")


def test_mixed_encodings_name_the_line(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p")
    good = b"Test Person loved the canal at dawn.\n"
    (root / "early_style.txt").write_bytes(good * 3 + "Caf\xe9 Sacher was her favourite.\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="'early_style.txt' is not valid UTF-8 \\(line 4\\)"):
        load_project(root)


def test_utf8_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p")
    (root / "early_style.txt").write_bytes(b"\xef\xbb\xbfI like the canal.\r\nI like the turbine too.\r\n")
    project = load_project(root)
    outcome = run(project, ["ingest"])[0]
    rows = [json.loads(x) for x in (project.output / "ingest" / "passages.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows if r["stage"] == "early" and r["kind"] == "style"]
    assert texts == ["I like the canal.", "I like the turbine too."] and outcome.stats["passages"] > 0


def test_minimal_yaml_still_fine() -> None:
    assert "stages:" in MINIMAL_YAML
