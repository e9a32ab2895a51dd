"""Project loading: the minimal format works; every problem is reported at once with the key and a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import EXAMPLES, MINIMAL_YAML, write_project
from persllm.config import PRESETS, DPOConfig, load_project, parse_model_spec
from persllm.errors import ConfigError


def test_minimal_project_loads_with_defaults(project_dir: Path) -> None:
    project = load_project(project_dir)
    assert project.name == "Test Person" and project.slug == "test-person"
    assert [s.id for s in project.stages] == ["early", "late"]
    assert project.teacher.backend == "default" and project.base_model.backend == "default"
    assert project.construct.kinds == {"ordinary": 0.4, "opinion": 0.3, "induced": 0.3}
    assert project.output == (project_dir / "out").resolve()


def test_examples_load() -> None:
    for example in ("ada-lovelace", "marie-curie"):
        project = load_project(EXAMPLES / example)
        assert len(project.stages) == 2


def test_preset_and_overrides_layer_in_order(project_dir: Path) -> None:
    project = load_project(project_dir, preset="demo", overrides=["sft.max_steps=7", "teacher=openai:gpt-x"])
    assert project.preset == "demo"
    assert project.sft.max_steps == 7  # --set beats the preset
    assert project.dpo.max_steps == PRESETS["demo"]["dpo"]["max_steps"] != DPOConfig().max_steps  # from the preset
    assert project.teacher.backend == "openai" and project.teacher.model == "gpt-x"


def test_all_problems_reported_at_once_with_suggestions(tmp_path: Path) -> None:
    yaml_text = MINIMAL_YAML.replace("language: en", "langauge: en\nsft:\n  lora_rank: 8") \
        .replace("late_style.txt", "late_styl.txt").replace("id: late", "id: early")
    root = write_project(tmp_path / "p", yaml_text)
    with pytest.raises(ConfigError) as err:
        load_project(root)
    message = str(err.value)
    assert "unknown key 'langauge' (did you mean 'language'?)" in message
    assert "unknown key 'sft.lora_rank' (did you mean 'lora_r'?)" in message
    assert "stage id 'early' is used twice" in message
    assert "'late_styl.txt' not found" in message and "did you mean 'late_style.txt'" in message
    assert len(err.value.problems) == 4


def test_empty_binary_and_non_utf8_material(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p")
    (root / "early_knowledge.txt").write_text("  \n\n", encoding="utf-8")
    (root / "early_style.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "late_knowledge.txt").write_bytes(b"\x00\x01binary\x00")
    with pytest.raises(ConfigError) as err:
        load_project(root)
    text = str(err.value)
    assert "'early_knowledge.txt' is empty" in text
    assert "'early_style.txt' is not valid UTF-8 (line 1)" in text
    assert "'late_knowledge.txt' looks like a binary file" in text


def test_type_errors_name_the_key(project_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_project(project_dir, overrides=["sft.lora_r=big", "sft.method=qlorra", "construct.kinds.opinon=1"])
    text = str(err.value)
    assert "sft.lora_r: expected int, got 'big'" in text
    assert "sft.method: 'qlorra' is not one of lora, qlora, full (did you mean 'qlora'?)" in text
    assert "unknown kind 'opinon' (did you mean 'opinion'?)" in text


def test_missing_required_keys_and_bad_stage_id(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p", "name: X\nstages:\n  - id: Early Years\n    label: 1900\n"
                                          "    knowledge: early_knowledge.txt\n")
    with pytest.raises(ConfigError) as err:
        load_project(root)
    assert "missing required key 'stages[0].style'" in str(err.value) or "missing required key 'style'" in str(err.value)


def test_label_numbers_become_strings(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p", MINIMAL_YAML.replace('label: "1900"', "label: 1900"))
    assert load_project(root).stages[0].label == "1900"


def test_nested_override_expands_a_shorthand(project_dir: Path) -> None:
    project = load_project(project_dir, overrides=["teacher=openai:m@http://127.0.0.1:9/v1", "teacher.concurrency=3"])
    assert (project.teacher.backend, project.teacher.model, project.teacher.base_url, project.teacher.concurrency) \
        == ("openai", "m", "http://127.0.0.1:9/v1", 3)


def test_model_spec_shorthand() -> None:
    spec = parse_model_spec("openai:llama3@http://127.0.0.1:8080/v1")
    assert (spec.backend, spec.model, spec.base_url) == ("openai", "llama3", "http://127.0.0.1:8080/v1")
    assert parse_model_spec("hf:org/model").model == "org/model"
    with_adapter = parse_model_spec("hf:/models/base+/runs/dpo/adapter")  # the form ModelSpec.spec prints
    assert (with_adapter.model, with_adapter.adapter) == ("/models/base", "/runs/dpo/adapter")
    assert parse_model_spec(with_adapter.spec) == with_adapter
    served = parse_model_spec("openai:ada-lovelace@mature:dpo@http://127.0.0.1:8000/v1")
    assert (served.model, served.base_url) == ("ada-lovelace@mature:dpo", "http://127.0.0.1:8000/v1")
    with pytest.raises(ValueError):
        parse_model_spec("ollama:x")


def test_missing_project_file_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="persllm init"):
        load_project(tmp_path / "nothing")


def test_exponent_without_a_dot_is_a_float(tmp_path: Path) -> None:
    from conftest import write_project

    root = write_project(tmp_path / "p")  # YAML 1.1 reads 4e-4 as a string; a learning rate is written so
    assert load_project(root, ["sft.learning_rate=4e-4"]).sft.learning_rate == 4e-4
