"""Files and folders persllm writes atomically get the user's umask, not mkstemp's 0600 or mkdtemp's 0700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from persllm.export import gguf as gguf_export
from persllm.workspace import atomic_dir, write_jsonl, write_text


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path: Path, umask: int) -> None:
    write_text(tmp_path / "a.txt", "x")
    write_jsonl(tmp_path / "b.jsonl", [{"a": 1}])
    with atomic_dir(tmp_path / "adapter") as tmp:
        write_text(tmp / "inside.json", "{}")
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.jsonl") == 0o666 & ~umask
    assert mode(tmp_path / "adapter") == 0o777 & ~umask
    assert mode(tmp_path / "adapter" / "inside.json") == 0o666 & ~umask


def test_gguf_files_follow_the_umask(tmp_path: Path, umask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GGUF writer itself is stubbed: what is checked is the temp-file-then-rename around it."""
    monkeypatch.setattr(gguf_export, "read_config", lambda merged: {})
    monkeypatch.setattr(gguf_export, "gemma3_hparams", lambda config: None)
    monkeypatch.setattr(gguf_export, "write_dense", lambda merged, path, *a: Path(path).write_bytes(b"GGUF"))
    monkeypatch.setattr(gguf_export, "quantize", lambda src, dst, outtype: Path(dst).write_bytes(b"GGUF q8"))
    written = gguf_export.export_ggufs(tmp_path, {"f16": tmp_path / "m-f16.gguf", "q8_0": tmp_path / "m-q8_0.gguf"})
    assert {name: mode(path) for name, path in written.items()} == {"f16": 0o666 & ~umask, "q8_0": 0o666 & ~umask}
