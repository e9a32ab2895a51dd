"""Containment: material files and output_dir stay inside the project unless persona.yaml says otherwise; every
escape is a ConfigError that says what to do, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MINIMAL_YAML, write_project
from persllm.config import load_project
from persllm.errors import ConfigError
from persllm.pipeline import run

OPT_OUT = "allow_outside_paths: true\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A readable text file outside the project (stands in for /etc/passwd or someone's notes)."""
    path = tmp_path / "secret.txt"
    path.write_text("root:x:0:0:root:/root:/bin/bash and other lines nobody meant to send to a teacher\n")
    return path


def project(tmp_path: Path, yaml_text: str = MINIMAL_YAML) -> Path:
    return write_project(tmp_path / "person", yaml_text)


@pytest.mark.parametrize("written", ["../secret.txt", "sub/../../secret.txt", "{outside}"])
def test_material_outside_the_project_is_refused(tmp_path: Path, outside: Path, written: str) -> None:
    written = written.format(outside=outside)
    root = project(tmp_path, MINIMAL_YAML.replace("early_knowledge.txt", written))
    with pytest.raises(ConfigError, match=r"stages\[0\] \(early\)\.knowledge: .* is outside the project directory"
                                          r".*allow_outside_paths: true") as info:
        load_project(root)
    assert "move it into" in str(info.value)
    (root / "persona.yaml").write_text(OPT_OUT + (root / "persona.yaml").read_text())
    assert load_project(root).material_file(written) == outside  # the user's explicit choice


def test_a_symlink_out_of_the_project_is_refused(tmp_path: Path, outside: Path) -> None:
    root = project(tmp_path)
    (root / "early_knowledge.txt").unlink()
    (root / "early_knowledge.txt").symlink_to(outside)
    with pytest.raises(ConfigError, match=rf"'early_knowledge.txt' is a symlink to {outside}, outside the project"):
        load_project(root)
    (root / "persona.yaml").write_text(OPT_OUT + (root / "persona.yaml").read_text())
    load_project(root)


def test_symlinks_inside_the_project_are_fine(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / "material").mkdir()
    (root / "early_knowledge.txt").rename(root / "material" / "early.txt")
    (root / "early_knowledge.txt").symlink_to(root / "material" / "early.txt")
    (root / "late_style.txt").rename(root / "material" / "late_style.txt")
    (root / "persona.yaml").write_text(MINIMAL_YAML.replace("late_style.txt", "material/../material/late_style.txt"))
    assert run(load_project(root, overrides=["teacher=fake"]), ["ingest"])[0].stats["passages"] > 0


def test_a_symlink_swapped_in_after_loading_is_refused_by_ingest(tmp_path: Path, outside: Path) -> None:
    root = project(tmp_path)
    loaded = load_project(root, overrides=["teacher=fake"])
    (root / "late_style.txt").unlink()
    (root / "late_style.txt").symlink_to(outside)
    with pytest.raises(ConfigError, match="symlink to .*outside the project"):
        run(loaded, ["ingest"])
    assert not (root / "out" / "ingest" / "passages.jsonl").exists()


@pytest.mark.parametrize("output_dir", ["../elsewhere", "/tmp/persllm-elsewhere", "link"])
def test_output_dir_outside_the_project_is_refused(tmp_path: Path, output_dir: str) -> None:
    root = project(tmp_path, "output_dir: " + output_dir + "\n" + MINIMAL_YAML)
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError, match=r"output_dir: .*outside the project.*allow_outside_paths: true.*--output"):
        load_project(root)
    (root / "persona.yaml").write_text(OPT_OUT + (root / "persona.yaml").read_text())
    load_project(root)


def test_output_on_the_command_line_may_be_anywhere(tmp_path: Path) -> None:
    root = project(tmp_path, "output_dir: ../elsewhere\n" + MINIMAL_YAML)
    assert load_project(root, overrides=[f"output_dir={tmp_path / 'bench'}"]).output == tmp_path / "bench"
    assert load_project(project(tmp_path / "b")).output == tmp_path / "b" / "person" / "out"  # the default


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_output_dir_that_is_a_file_is_a_clear_error(tmp_path: Path, where: str) -> None:
    root = project(tmp_path, "output_dir: results" + ("" if where == "file" else "/out") + "\n" + MINIMAL_YAML)
    (root / "results").write_text("my notes\n")
    with pytest.raises(ConfigError, match="is a file"):
        load_project(root)
    result = subprocess.run([sys.executable, "-m", "persllm", "ingest", str(root)], capture_output=True, text=True,
                            check=False, timeout=120, env=dict(os.environ, COLUMNS="400"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "output_dir:" in result.stderr and "is a file" in result.stderr
    assert (root / "results").read_text() == "my notes\n"
