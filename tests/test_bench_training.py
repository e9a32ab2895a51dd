"""The training benchmark's bookkeeping: lock-step turns between sides, per-step summaries and paired ratios (no
model is loaded; the real workers run only under `python -m benchmarks training`)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from benchmarks import training

FAKE_WORKER = textwrap.dedent("""\
    import json, os, sys
    go, done = (int(fd) for fd in sys.argv[1].split(","))
    name, steps, log = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    for step in range(steps):
        os.read(go, 1)
        with open(log, "a") as fh:
            fh.write(f"{name}{step}\\n")
        if name == "broken" and step == 1:
            sys.exit("broken worker")
        os.write(done, b"s")
    os.read(go, 1)
    os.write(done, b"e")
    os.read(go, 1)  # released when every side is done
    with open(log, "a") as fh:
        fh.write(f"{name} done\\n")
    print(json.dumps({"name": name}))
""")


def test_lockstep_sides_take_turns_step_by_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script, log = tmp_path / "worker.py", tmp_path / "log.txt"
    script.write_text(FAKE_WORKER)
    steps = {"a": 3, "b": 2, "broken": 3}
    monkeypatch.setattr(training, "_command", lambda name, start, turns=None: [
        sys.executable, str(script), turns, name, str(steps[name]), str(log)])
    results = training.lockstep(("a", "b", "broken"))
    order = log.read_text().split()
    # round robin, one step at a time; a side that ends or fails drops out; work after training waits for all
    assert order[:7] == ["a0", "b0", "broken0", "a1", "b1", "broken1", "a2"]
    assert sorted(order[7:]) == ["a", "b", "done", "done"]
    assert results["a"]["name"] == "a" and results["b"]["name"] == "b"
    assert "broken worker" in results["broken"]["error"]


def test_summary_skips_the_warm_up_and_pairs_steps_by_throughput() -> None:
    timer = SimpleNamespace(steps=[(0.0, 5.0, 100), (5.0, 6.0, 300), (6.0, 8.0, 500)])
    summary = training.summarize(timer)
    assert summary["steps"] == 2 and summary["tokens"] == 400 and summary["step_tokens"] == [200, 200]
    assert summary["tokens_per_second"] == pytest.approx(400 / 3)
    other = {"step_tokens": [100, 300], "step_seconds": [1.0, 3.0]}
    # persllm: 200 and 100 tokens/s; the baseline: 100 and 100 tokens/s
    assert training.median_step_speedup(summary, other) == pytest.approx(1.5)
