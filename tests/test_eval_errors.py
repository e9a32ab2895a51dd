"""Fail fast, with a clear message: unreachable endpoints, missing adapters, bad model names and settings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import free_port, write_project
from eval_helpers import TINY_YAML, prepare_workspace
from persllm.backends.fake import FakeBackend
from persllm.config import load_project
from persllm.errors import BackendError, ConfigError, DataError
from persllm.eval import evaluate


@pytest.fixture
def tiny_project(tmp_path: Path, tiny_model: Path):  # type: ignore[no-untyped-def]
    def make(*overrides: str):  # type: ignore[no-untyped-def]
        project_dir = write_project(tmp_path / "person", TINY_YAML.format(model=tiny_model))
        project = load_project(project_dir, overrides=list(overrides))
        return project, prepare_workspace(project)
    return make


def test_unreachable_endpoint_fails_fast(tiny_project) -> None:  # type: ignore[no-untyped-def]
    url = f"http://127.0.0.1:{free_port()}/v1"
    project, ws = tiny_project(f'eval.models=["base","openai:x@{url}"]')
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"cannot reach the OpenAI-compatible endpoint .*127\.0\.0\.1"):
        evaluate(project, ws, judge=FakeBackend(), teacher=FakeBackend())
    assert time.monotonic() - started < 20  # before any local model is loaded or any answer generated
    assert not (ws.stage_dir("eval") / "report.json").exists()


def test_missing_adapter_fails_fast_naming_the_fix(tiny_project) -> None:  # type: ignore[no-untyped-def]
    project, ws = tiny_project('eval.models=["base","dpo"]')
    with pytest.raises(ConfigError) as info:
        evaluate(project, ws, judge=FakeBackend(), teacher=FakeBackend())
    message = str(info.value)
    assert "no DPO adapter at" in message and "persllm train" in message and "available now: base" in message


def test_unknown_model_and_bad_settings(tiny_project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    project, ws = tiny_project('eval.models=["gpt4"]')
    with pytest.raises(ConfigError, match="unknown model 'gpt4'"):
        evaluate(project, ws)
    project, ws = tiny_project('eval.models=["base","base"]')
    with pytest.raises(ConfigError, match="twice"):
        evaluate(project, ws)
    project, ws = tiny_project('eval.ipip_stages=["middle"]')
    with pytest.raises(ConfigError, match="eval.ipip_stages: unknown stage"):
        evaluate(project, ws, judge=FakeBackend(), teacher=FakeBackend())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n', encoding="utf-8")
    project, ws = tiny_project(f"eval.probes={bad}")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'kind' must be a non-empty string"):
        evaluate(project, ws, judge=FakeBackend(), teacher=FakeBackend())


def test_missing_construct_output_names_the_command(project_dir: Path) -> None:
    from persllm.workspace import Workspace

    project = load_project(project_dir)  # checked before the models, so nothing is loaded or converted
    with pytest.raises(DataError, match=r"passages\.jsonl; run `persllm ingest"):
        evaluate(project, Workspace.of(project))


def test_config_validation(project_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval\.target\.early\.O: 7.0 is outside the 1-5 scale"):
        load_project(project_dir, overrides=["eval.target={early: {O: 7}}"])
    with pytest.raises(ConfigError, match="unknown domain 'X'"):
        load_project(project_dir, overrides=["eval.target={early: {X: 3}}"])
    with pytest.raises(ConfigError, match="judge_repeats"):
        load_project(project_dir, overrides=["eval.judge_repeats=0"])
    from persllm.eval import _ipip_stages

    assert _ipip_stages(load_project(project_dir, overrides=['eval.ipip_stages=["last"]'])) == ["late"]
    assert _ipip_stages(load_project(project_dir)) == ["early", "late"]
    assert _ipip_stages(load_project(project_dir, overrides=["eval.ipip=false"])) == []
    project = load_project(project_dir, preset="demo")
    assert project.eval.think is False and project.eval.max_new_tokens == 80 and project.eval.max_probes >= 24
