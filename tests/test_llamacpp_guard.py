"""The llama.cpp build check: a build that crashes on this CPU is reported with the fix, not as a dead process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from persllm.backends import llamacpp
from persllm.errors import DependencyError

pytest.importorskip("llama_cpp")


def test_probe_names_the_signal_that_killed_the_child() -> None:
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    assert llamacpp.probe_crash(crash) == "SIGSEGV"
    assert llamacpp.probe_crash([sys.executable, "-c", "raise SystemExit(3)"]) == ""  # an error, not a crash


def test_a_crashing_build_is_reported_with_the_rebuild_command(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    calls: list[list[str]] = []
    monkeypatch.setattr(llamacpp, "probe_crash", lambda cmd: calls.append(list(cmd)) or "SIGSEGV")
    with pytest.raises(DependencyError, match="SIGSEGV.*GGML_NATIVE=OFF"):
        llamacpp.LlamaCpp(model)
    assert calls and calls[0][-1] == str(model)


def test_a_good_build_is_checked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    calls: list[object] = []
    monkeypatch.setattr(llamacpp, "probe_crash", lambda cmd: calls.append(cmd) or "")
    llamacpp.check_build(model)
    llamacpp.check_build(model)
    assert len(calls) == 1
