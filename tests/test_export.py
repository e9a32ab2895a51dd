"""`persllm export` writes what `persllm train` trains on (the repeated and mixed SFT records, the general data, the
test split, the DPO pairs) with each tool's configs; TRL trains from it with a stock tokenizer.

The check with the real LLaMA-Factory and axolotl is `python -m benchmarks exports` (they need venvs of their own).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from persllm import export as exporter
from persllm.config import load_project
from persllm.general import load_general
from persllm.pipeline import build_dpo_pairs, run
from persllm.train.data import build_sft_records
from persllm.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _project(project_dir: Path, tiny_model: Path, *overrides: str):  # type: ignore[no-untyped-def]
    project = load_project(project_dir, overrides=["teacher=fake", "construct.mode=grounded",
                                                   f"base_model=hf:{tiny_model}", *overrides])
    run(project, ["ingest", "construct"])
    return project


def _inputs(project):  # type: ignore[no-untyped-def]
    ws = Workspace.of(project)
    samples = ws.samples()
    pairs, _ = build_dpo_pairs(project, ws, samples)
    return samples, pairs, [list(r.messages) for r in load_general(project)[0]]


@pytest.fixture
def tokens_project(project_dir: Path, tiny_model: Path):  # type: ignore[no-untyped-def]
    return _project(project_dir, tiny_model, "sft.temporal_labels=tokens")


@pytest.fixture
def bundle(tokens_project):  # type: ignore[no-untyped-def]
    return exporter.build_bundle(tokens_project, *_inputs(tokens_project))


def _jsonl(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_exports_hold_the_records_persllm_trains_on(tokens_project, bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same repeated personified samples and general conversations, kind by kind, in every format."""
    from persllm.train.sft import prepare_sft

    samples, _, general = _inputs(tokens_project)
    trained = prepare_sft(tokens_project, samples, general, tmp_path / "sft", resume=False)
    trained.tracker.close()
    counts = trained.counts
    assert counts["general"] > 0 and tokens_project.sft.repeat > 1  # the mix is really mixed and repeated
    expected = {"persona": counts["personified"], "general": counts["general"]}
    expected_kinds = {k.removeprefix("kind_"): v * tokens_project.sft.repeat for k, v in counts.items()
                      if k.startswith("kind_")}
    files = {fmt: exporter.write(bundle, fmt, tmp_path / fmt) for fmt in exporter.FORMATS}

    trl_rows = _jsonl(tmp_path / "trl" / "sft_train.jsonl")
    assert len(trl_rows) == len(trained.trainer.train_dataset) == counts["records"] - counts["dropped_too_long"]
    assert Counter(r["origin"] for r in trl_rows) == expected
    assert Counter(r["kind"] for r in trl_rows if r["origin"] == "persona") == expected_kinds
    records, _ = build_sft_records(tokens_project, samples, general)
    trimmed = [[{"role": m["role"], "content": m["content"].strip()} for m in r["messages"]] for r in records]
    assert [r["messages"] for r in trl_rows] == trimmed  # the training order, too
    assert [r["messages"] for r in _jsonl(tmp_path / "axolotl" / "sft_train.jsonl")] == trimmed
    assert [r["messages"] for r in _jsonl(tmp_path / "openai" / "openai_sft_train.jsonl")] == trimmed
    name = bundle.name
    sharegpt = json.loads((tmp_path / "llamafactory" / f"{name}_sft.json").read_text())
    assert Counter(r["origin"] for r in sharegpt) == expected and len(sharegpt) == len(trl_rows)
    manifest = json.loads((tmp_path / "llamafactory" / "export.json").read_text())
    assert manifest["counts"]["sft_persona"] == counts["personified"]
    assert manifest["counts"]["sft_general"] == counts["general"]

    test_ids = {s.id for s in samples if s.split == "test"}
    assert {r["id"] for r in _jsonl(tmp_path / "trl" / "sft_test.jsonl")} == test_ids
    split = {s.id: s.split for s in samples}
    dpo = _jsonl(tmp_path / "trl" / "dpo_train.jsonl")
    assert dpo and {split[r["sample_id"]] for r in dpo} == {"train"}
    assert {split[r["sample_id"]] for r in _jsonl(tmp_path / "trl" / "dpo_test.jsonl")} == {"test"}
    for fmt, written in files.items():
        assert all(path.exists() for path in written), fmt


def test_stage_tokens_and_markers_are_declared_for_each_tool(bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert bundle.stage_tokens == ("<TIME-I>", "<TIME-II>")
    for fmt in exporter.FORMATS:
        exporter.write(bundle, fmt, tmp_path / fmt)
    sft_text = (tmp_path / "llamafactory" / "llamafactory_sft.yaml").read_text()
    lf = yaml.safe_load(sft_text)
    lf_dpo = yaml.safe_load((tmp_path / "llamafactory" / "llamafactory_dpo.yaml").read_text())
    for config in (lf, lf_dpo):
        assert config["add_special_tokens"] == "<TIME-I>,<TIME-II>" and config["resize_vocab"] is True
        assert "template" not in config
    assert "No `template` key" in sft_text
    assert lf["model_name_or_path"] == bundle.base_model and lf["cutoff_len"] == bundle.project.sft.max_length
    assert lf_dpo["cutoff_len"] == bundle.project.dpo.max_length and lf_dpo["pref_beta"] == bundle.project.dpo.beta
    assert lf_dpo["adapter_name_or_path"] == lf["output_dir"] and lf_dpo["create_new_adapter"] is True
    assert lf["eval_dataset"] in json.loads((tmp_path / "llamafactory" / "dataset_info.json").read_text())
    ax = yaml.safe_load((tmp_path / "axolotl" / "axolotl_sft.yaml").read_text())
    ax_dpo = yaml.safe_load((tmp_path / "axolotl" / "axolotl_dpo.yaml").read_text())
    assert ax["special_tokens"]["additional_special_tokens"] == ["<TIME-I>", "<TIME-II>"]
    assert ax["eot_tokens"] == ax_dpo["eot_tokens"] == ["<end_of_turn>"]
    assert "<start_of_turn>assistant" in ax["chat_template_jinja"] and "{% generation %}" not in ax["chat_template_jinja"]
    assert ax["peft_trainable_token_indices"] == list(bundle.trainable_token_ids)
    assert ax["sequence_len"] == bundle.project.sft.max_length and ax_dpo["sequence_len"] == bundle.project.dpo.max_length
    sft = bundle.project.sft
    assert (ax["micro_batch_size"], ax["gradient_accumulation_steps"], ax["learning_rate"], ax["lora_dropout"],
            ax["warmup_ratio"]) == (sft.batch_size, sft.grad_accum, sft.learning_rate, sft.lora_dropout,
                                    sft.warmup_ratio)
    assert ax["test_datasets"][0]["path"].endswith("sft_test.jsonl") and ax_dpo["rl_beta"] == bundle.project.dpo.beta
    trl = json.loads((tmp_path / "trl" / "trl_sft.json").read_text())
    assert trl["stage_tokens"] == ["<TIME-I>", "<TIME-II>"] and trl["sft_config"]["eos_token"] == "<end_of_turn>"
    assert "{% generation %}" in (tmp_path / "trl" / "chat_template.jinja").read_text()


def test_markers_come_from_the_base_tokenizer(tokens_project, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A ChatML base gets ChatML's markers in the template and eot_tokens, not Gemma's."""
    from persllm.models import prepare_tokenizer
    from tiny import build_tokenizer

    tokenizer = build_tokenizer(markers=("<|im_start|>", "<|im_end|>"))
    prepare_tokenizer(tokenizer)
    chatml = exporter.build_bundle(tokens_project, *_inputs(tokens_project), tokenizer=tokenizer, base_model=str(tiny_model))
    assert chatml.markers == ("<|im_start|>", "<|im_end|>")
    exporter.write(chatml, "axolotl", tmp_path)
    ax = yaml.safe_load((tmp_path / "axolotl_sft.yaml").read_text())
    assert ax["eot_tokens"] == ["<|im_end|>"]
    assert "<|im_start|>assistant" in ax["chat_template_jinja"] and "<start_of_turn>" not in ax["chat_template_jinja"]


def test_trl_trains_from_the_export_with_a_stock_tokenizer(bundle, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Stock tokenizer (no chat template) + the exported template, stage tokens and configs: one SFT step, labels
    ending at the end-of-turn marker, stage tokens whole."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, SFTConfig, SFTTrainer

    exporter.write(bundle, "trl", tmp_path)
    sft = json.loads((tmp_path / "trl_sft.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None  # stock: the template comes from the export
    tokenizer.add_special_tokens({"extra_special_tokens": sft["stage_tokens"]}, replace_extra_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(sft["model"])
    model.resize_token_embeddings(len(tokenizer))
    assert [tokenizer.convert_tokens_to_ids(t) for t in sft["trainable_tokens"]] == \
        sft["lora_config"]["trainable_token_indices"]
    config = sft["sft_config"] | {"max_steps": 1, "use_cpu": True, "save_strategy": "no"}
    dataset = load_dataset("json", data_files=sft["train_file"], split="train")
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=SFTConfig(**config),
                         peft_config=LoraConfig(**sft["lora_config"]))
    head = trainer.model.get_base_model().get_output_embeddings()
    head.bias = None  # the documented TRL 1.16 workaround: its fused head reads a bias PEFT's tied wrapper lacks
    row = trainer.train_dataset[0]
    labels = trainer.data_collator([row])["labels"][0].tolist()
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert [x for x in labels if x != -100][-1] == end
    stage_ids = {tokenizer.convert_tokens_to_ids(t) for t in sft["stage_tokens"]}
    text = " ".join(m["content"] for m in dataset[0]["messages"])
    assert sum(i in stage_ids for i in row["input_ids"]) == text.count("<TIME-")
    assert trainer.train().global_step == 1
    dpo = json.loads((tmp_path / "trl_dpo.json").read_text())
    assert DPOConfig(**dpo["dpo_config"]).beta == bundle.project.dpo.beta


def test_dpo_configs_carry_the_chosen_answers_lm_loss(bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """dpo.sft_weight reaches every tool as its own setting (TRL/axolotl loss types, LLaMA-Factory pref_ftx)."""
    from trl import DPOConfig

    bundle.project.dpo.sft_weight = 0.5
    for fmt in ("trl", "llamafactory", "axolotl"):
        exporter.write(bundle, fmt, tmp_path / fmt)
    trl = DPOConfig(**json.loads((tmp_path / "trl" / "trl_dpo.json").read_text())["dpo_config"])
    assert list(trl.loss_type) == ["sigmoid", "sft"] and list(trl.loss_weights) == [1.0, 0.5]
    lf = yaml.safe_load((tmp_path / "llamafactory" / "llamafactory_dpo.yaml").read_text())
    assert lf["pref_ftx"] == 0.5 and lf["pref_loss"] == "sigmoid"
    ax = yaml.safe_load((tmp_path / "axolotl" / "axolotl_dpo.yaml").read_text())
    assert ax["dpo_loss_type"] == ["sigmoid", "sft"] and ax["dpo_loss_weights"] == [1.0, 0.5]


def test_openai_files_follow_the_fine_tuning_formats(bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    exporter.write(bundle, "openai", tmp_path)
    chat = _jsonl(tmp_path / "openai_sft_train.jsonl")
    assert len(chat) == bundle.counts["sft_records"]
    for line in chat:
        assert set(line) == {"messages"}
        roles = [m["role"] for m in line["messages"]]
        assert set(roles) <= {"system", "user", "assistant"} and roles[-1] == "assistant"
        assert all(isinstance(m["content"], str) and m["content"] for m in line["messages"])
    prefs = _jsonl(tmp_path / "openai_preference_train.jsonl")
    assert len(prefs) == bundle.counts["dpo_train"]
    for line in prefs:
        assert set(line) == {"input", "preferred_output", "non_preferred_output"}
        assert line["input"]["messages"][-1]["role"] == "user"
        for side in ("preferred_output", "non_preferred_output"):
            assert [m["role"] for m in line[side]] == ["assistant"] and line[side][0]["content"]
    jobs = json.loads((tmp_path / "openai_jobs.json").read_text())
    assert jobs["dpo"]["method"]["dpo"]["hyperparameters"]["beta"] == bundle.project.dpo.beta


def test_kto_rows_tag_each_answer_once(bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    exporter.write(bundle, "llamafactory", tmp_path)
    rows = json.loads((tmp_path / f"{bundle.name}_kto.json").read_text())
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info[f"{bundle.name}_kto"]["columns"]["kto_tag"] == "kto_tag"
    assert {r["kto_tag"] for r in rows} == {True, False}
    assert sum(not r["kto_tag"] for r in rows) == len(bundle.dpo_train)
    keys = [(r["system"], json.dumps(r["conversations"]), r["kto_tag"]) for r in rows]
    assert len(keys) == len(set(keys))


def test_export_files_follow_the_umask(bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    previous = os.umask(0o022)
    try:
        written = [p for fmt in exporter.FORMATS for p in exporter.write(bundle, fmt, tmp_path / fmt)]
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}


def test_export_cli_writes_pairs_before_dpo_ran(project_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    project = _project(project_dir, tiny_model)
    assert Workspace.of(project).manifest("dpo") is None
    result = subprocess.run([sys.executable, "-m", "persllm", "export", str(project.root), "--set", "teacher=fake",
                             "--set", "construct.mode=grounded", "--set", f"base_model=hf:{tiny_model}",
                             "--to", str(tmp_path / "x")], capture_output=True, text=True, timeout=180,
                            check=False)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "x"
    assert (out / "llamafactory" / "dataset_info.json").exists() and (out / "llamafactory" / "llamafactory_dpo.yaml").exists()
    assert _jsonl(out / "trl" / "dpo_train.jsonl") and (out / "axolotl" / "axolotl_dpo.yaml").exists()
    assert _jsonl(out / "openai" / "openai_preference_train.jsonl")
    assert "SFT records" in result.stdout + result.stderr


@pytest.mark.parametrize("markers", [("<start_of_turn>", "<end_of_turn>"), ("<|im_start|>", "<|im_end|>")])
def test_assistant_slot_is_exactly_what_is_trained(markers: tuple[str, str]) -> None:
    """LLaMA-Factory labels the whole assistant slot it parses from the template (what a [user, assistant] rendering
    adds after the [user] generation prompt); it must be the answer and the end marker, nothing more, or the tool
    trains a token persllm does not (a newline after the marker did)."""
    from jinja2 import Environment

    from persllm import template
    from persllm.types import Message

    start, end = markers
    jinja = Environment().from_string(template.chat_template(start, end, training=False))
    user = [{"role": "system", "content": "S"}, {"role": "user", "content": "{{content}}"}]
    turn = [*user, {"role": "assistant", "content": "{{content}}"}]
    prompt = jinja.render(messages=user, add_generation_prompt=True, bos_token="")
    full = jinja.render(messages=turn, add_generation_prompt=False, bos_token="")
    assert full[len(prompt):] == "{{content}}" + end
    assert full == template.render([Message(**m) for m in turn], start, end)
