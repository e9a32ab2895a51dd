"""The command line as users meet it: exit codes, one-line errors, nothing half-written, fast --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MINIMAL_YAML, free_port, write_project


def persllm(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess."""
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "persllm", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env, check=False)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert lines, f"no error line in stderr:\n{result.stderr}"
    return lines[0]


def test_help_is_fast_and_does_not_import_torch() -> None:
    code = "import sys; from persllm.cli import main; from persllm.cli import commands; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    result = persllm("--help")
    assert result.returncode == 0 and "construct" in result.stdout and "run" in result.stdout


def test_init_then_running_before_filling_files_fails_clearly(tmp_path: Path) -> None:
    result = persllm("init", str(tmp_path / "jane"), "--name", "Jane Doe", "--stages", "young,old")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "jane" / "persona.yaml").read_text()
    assert "name: Jane Doe" in text and "id: young" in text and "id: old" in text
    result = persllm("run", str(tmp_path / "jane"))
    assert result.returncode == 1
    assert "young_knowledge.txt' is empty" in result.stderr
    assert "stages[0] (young).label: still the TODO placeholder" in result.stderr
    assert not (tmp_path / "jane" / "out").exists()


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda root: (root / "persona.yaml").write_text(MINIMAL_YAML + "tacher: openai:gpt\n"),
     "unknown key 'tacher' (did you mean 'teacher'?)"),
    (lambda root: (root / "persona.yaml").write_text(MINIMAL_YAML.replace("id: late", "id: early")),
     "stage id 'early' is used twice"),
    (lambda root: (root / "late_style.txt").write_bytes(b"\xff\xfe bad bytes\n"), "is not valid UTF-8"),
    (lambda root: (root / "late_style.txt").unlink(), "'late_style.txt' not found"),
    (lambda root: (root / "early_style.txt").write_text(""), "'early_style.txt' is empty"),
])
def test_bad_input_one_line_error_and_nothing_written(tmp_path: Path, mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    root = write_project(tmp_path / "p")
    mutate(root)
    result = persllm("run", str(root))
    assert result.returncode == 1
    assert expected in error_line(result)
    assert not (root / "out").exists()


def test_unreachable_teacher_fails_fast_without_partial_output(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p")
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = persllm("construct", str(root), "--set", f"teacher=openai:some-model@{url}", timeout=60)
    assert result.returncode == 1
    line = error_line(result)
    assert "cannot reach" in line and url in line
    assert not (root / "out" / "construct").exists()
    assert (root / "out" / "ingest" / "manifest.json").exists()  # finished stages stay finished


def test_unknown_stage_in_chat_style_commands_and_unknown_command(tmp_path: Path) -> None:
    result = persllm("frobnicate")
    assert result.returncode == 2 and "No such command" in result.stderr
