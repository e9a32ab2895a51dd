"""One writer per output folder: a second command fails at once naming the first; a killed holder's lock is taken."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from persllm.config import load_project
from persllm.errors import DataError, ProjectLockedError
from persllm.pipeline import run
from persllm.workspace import LOCK, STAGES, Workspace, project_lock

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", COLUMNS="400")
SMALL = ["teacher=fake", "construct.mode=grounded", "construct.questions_per_passage=1",
         "construct.general_per_stage=1", "sft.batch_size=2", "sft.max_steps=4", "sft.save_steps=2",
         "dpo.batch_size=2", "dpo.max_steps=2", "eval.models=[base,sft,dpo]", "eval.max_new_tokens=4",
         "eval.max_probes=4", "eval.heldout_questions=1", "eval.judge_items=0", "eval.ipip=false",
         "eval.ipip_interview_items=0"]
HOLD = textwrap.dedent("""\
    import sys, time
    from persllm.workspace import project_lock
    with project_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_two_runs_started_together_exactly_one_runs(project_dir: Path, tiny_model: Path) -> None:
    sets = [a for s in [f"base_model=hf:{tiny_model}", *SMALL] for a in ("--set", s)]
    command = [sys.executable, "-m", "persllm", "run", str(project_dir), *sets]
    started = time.monotonic()
    procs = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        while all(p.poll() is None for p in procs):
            assert time.monotonic() - started < 300, "neither run finished"
            time.sleep(0.05)
        first = next(p for p in procs if p.poll() is not None)
        other = procs[1 - procs.index(first)]
        first_seconds = time.monotonic() - started
        still_running = other.poll() is None
        outputs = {id(p): p.communicate(timeout=600) for p in procs}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    loser, winner = first, other
    assert loser.returncode == 1, outputs[id(loser)][1][-3000:]
    assert winner.returncode == 0, outputs[id(winner)][1][-3000:]
    assert still_running, "the second run waited for the first instead of failing at once"
    assert first_seconds < 60
    message = " ".join(outputs[id(loser)][1].split())
    assert f"is in use: another persllm process (PID {winner.pid}" in message and "persllm run" in message
    assert "Traceback" not in message
    # the folder holds one run's results, every stage complete and verified
    ws = Workspace(project_dir / "out")
    for stage in STAGES:
        manifest = ws.manifest(stage)
        assert manifest is not None and not ws.changed(manifest), stage
    assert (project_dir / "out" / LOCK).read_text() == ""  # released: no stale holder for the next message


def test_a_killed_holders_lock_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(ProjectLockedError, match=rf"PID {holder.pid}\b.*kill {holder.pid}"), project_lock(out):
            pass
        assert time.monotonic() - started < 5  # fails at once, never waits
        assert json.loads((out / LOCK).read_text())["pid"] == holder.pid
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert json.loads((out / LOCK).read_text())["pid"] == holder.pid  # the dead holder's details are still there
    with project_lock(out):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


def test_the_pipeline_holds_the_lock_and_releases_it_on_failure(project_dir: Path) -> None:
    project = load_project(project_dir, overrides=["teacher=fake"])
    with project_lock(project.output), pytest.raises(ProjectLockedError, match=f"PID {os.getpid()}"):
        run(project, ["ingest"])
    assert not (project.output / "ingest").exists()  # nothing was written while another process held the lock
    (project_dir / "early_style.txt").write_text("no\n")  # too short: ingest now fails inside the lock
    with pytest.raises(DataError, match="no usable paragraph"):
        run(project, ["ingest"])
    with project_lock(project.output):  # released although the run failed
        pass
