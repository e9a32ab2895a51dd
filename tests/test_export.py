"""Exports load with `datasets` and the TRL file trains with trl.SFTTrainer unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from persllm import export as exporter
from persllm.config import load_project
from persllm.pipeline import load_samples, run, workspace
from persllm.types import Message, PreferencePair


@pytest.fixture
def constructed(project_dir: Path, tiny_model: Path):  # type: ignore[no-untyped-def]
    project = load_project(project_dir, overrides=["teacher=fake", "construct.mode=grounded",
                                                   f"base_model=hf:{tiny_model}"])
    run(project, ["ingest", "construct"])
    return project


def _pairs() -> list[PreferencePair]:
    prompt = (Message("system", "You are Test Person."), Message("user", "Where were you born?"))
    return [PreferencePair("p1", "s1", "other_stage", prompt, "[Response] Graz.", "[Response] Berlin.")]


def test_all_formats_load_with_datasets(constructed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from datasets import load_dataset

    samples = load_samples(workspace(constructed))
    for fmt in exporter.FORMATS:
        files = exporter.export(constructed, samples, _pairs(), fmt, tmp_path / fmt)
        for path in files:
            if path.suffix in (".json", ".jsonl") and path.name != "dataset_info.json":
                data = load_dataset("json", data_files=str(path), split="train")
                assert len(data) > 0, path
    trl_rows = [json.loads(x) for x in (tmp_path / "trl" / "sft_train.jsonl").read_text().splitlines()]
    first = trl_rows[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert "You are Test Person" in first[0]["content"] and first[2]["content"].startswith("[Analysis]")
    info = json.loads((tmp_path / "llamafactory" / "dataset_info.json").read_text())
    assert info["persllm_test_person_dpo"]["ranking"] is True
    sharegpt = json.loads((tmp_path / "llamafactory" / "persllm_test_person_sft.json").read_text())
    assert sharegpt[0]["system"] and [t["from"] for t in sharegpt[0]["conversations"]] == ["human", "gpt"]
    axolotl = (tmp_path / "axolotl" / "axolotl_sft.yaml").read_text()
    assert "chat_template_jinja" in axolotl and "roles_to_train" in axolotl


def test_trl_file_is_accepted_by_sft_trainer(constructed, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    files = exporter.export(constructed, load_samples(workspace(constructed)), [], "trl", tmp_path)
    dataset = load_dataset("json", data_files=str(files[0]), split="train")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), processing_class=tokenizer,
                         train_dataset=dataset,
                         args=SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                                        bf16=False, use_cpu=True, report_to="none", assistant_only_loss=True,
                                        gradient_checkpointing=False, save_strategy="no", max_length=512))
    assert trainer.train().global_step == 1


def test_export_cli(constructed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run([sys.executable, "-m", "persllm", "export", str(constructed.root), "--set", "teacher=fake",
                             "--set", "construct.mode=grounded", "--to", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x" / "llamafactory" / "dataset_info.json").exists()
    assert (tmp_path / "x" / "trl" / "sft_train.jsonl").exists()
