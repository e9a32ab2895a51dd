"""TRL: conversational JSONL, persllm's training chat template, and the SFTConfig / DPOConfig / LoraConfig values.

A stock tokenizer plus `chat_template.jinja` (SFTConfig.chat_template_path) trains the same assistant-only labels as
`persllm train`, ending at the template's end-of-turn marker (SFTConfig.eos_token). See docs/export-trl.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persllm.export.bundle import Bundle, chat, hyper, manifest, pair_answer
from persllm.train.data import MixRecord
from persllm.train.dpo import loss_args
from persllm.types import PreferencePair
from persllm.workspace import write_json, write_jsonl, write_text


def sft_rows(records: tuple[MixRecord, ...]) -> list[dict[str, Any]]:
    """TRL conversational language-modelling rows: {"id", "origin", "kind", "messages"} (TRL ignores the extras)."""
    return [{"id": r.source_id, "origin": r.origin, "kind": r.kind, "messages": chat(r.messages)} for r in records]


def dpo_rows(pairs: tuple[PreferencePair, ...]) -> list[dict[str, Any]]:
    """TRL conversational preference rows: prompt / chosen / rejected message lists."""
    return [{"id": p.id, "sample_id": p.sample_id, "negative_type": p.negative_type, "prompt": chat(p.prompt),
             "chosen": [{"role": "assistant", "content": pair_answer(p, "chosen")}],
             "rejected": [{"role": "assistant", "content": pair_answer(p, "rejected")}]} for p in pairs]


def lora_config(bundle: Bundle, trainable_tokens: bool) -> dict[str, Any] | None:
    """peft.LoraConfig keyword arguments (None for full fine-tuning); SFT also trains the marker/stage-token rows."""
    lora = hyper(bundle.project)["lora"]
    if lora["method"] == "full":
        return None
    config: dict[str, Any] = {"r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
                              "target_modules": lora["targets"], "task_type": "CAUSAL_LM", "bias": "none"}
    if trainable_tokens and bundle.trainable_token_ids:
        ids = list(bundle.trainable_token_ids)
        config["trainable_token_indices"] = ids if bundle.tied_embeddings else {"embed_tokens": ids, "lm_head": ids}
    return config


def sft_config(bundle: Bundle, out: Path) -> dict[str, Any]:
    """trl.SFTConfig keyword arguments persllm's SFT uses."""
    values = hyper(bundle.project)
    sft = values["sft"]
    return {**_schedule(sft, values["seed"], out / "runs" / "sft"),
            "lr_scheduler_kwargs": sft["lr_scheduler_kwargs"],
            "max_length": sft["max_length"], "assistant_only_loss": True, "eos_token": bundle.end_marker,
            "chat_template_path": str(out / "chat_template.jinja"),
            **_common(bundle, sft["save_steps"])}


def dpo_config(bundle: Bundle, out: Path) -> dict[str, Any]:
    """trl.DPOConfig keyword arguments persllm's DPO uses."""
    values = hyper(bundle.project)
    dpo = values["dpo"]
    return {**_schedule(dpo, values["seed"], out / "runs" / "dpo"), "beta": dpo["beta"],
            "max_length": dpo["max_length"], **loss_args(dpo["sft_weight"]), **_common(bundle, dpo["save_steps"])}


def _schedule(stage: dict[str, Any], seed: int, output_dir: Path) -> dict[str, Any]:
    """The optimisation settings SFTConfig and DPOConfig share, from one stage's hyper-parameters."""
    return {"output_dir": str(output_dir), "seed": seed, "data_seed": seed,
            "learning_rate": stage["learning_rate"], "num_train_epochs": stage["epochs"],
            "max_steps": stage["max_steps"], "per_device_train_batch_size": stage["batch_size"],
            "gradient_accumulation_steps": stage["grad_accum"],
            # a float below 1 is a share of the steps (transformers 5 replaced warmup_ratio with it)
            "warmup_steps": stage["warmup_ratio"], "weight_decay": stage["weight_decay"],
            "lr_scheduler_type": stage["lr_scheduler_type"]}


def _common(bundle: Bundle, save_steps: int) -> dict[str, Any]:
    from persllm.train._trainer import checkpointing_arg

    return {"bf16": bundle.bf16, checkpointing_arg(): False, "save_steps": save_steps, "logging_steps": 1,
            "report_to": "none"}


def write(bundle: Bundle, out: Path) -> list[Path]:
    """Write the TRL export into `out`; return the files."""
    files = [out / "sft_train.jsonl", out / "sft_test.jsonl", out / "chat_template.jinja", out / "trl_sft.json"]
    write_jsonl(files[0], sft_rows(bundle.sft_train))
    write_jsonl(files[1], sft_rows(bundle.sft_test))
    write_text(files[2], bundle.training_template)
    write_json(files[3], {
        "model": bundle.base_model, "train_file": str(files[0]), "eval_file": str(files[1]),
        "stage_tokens": list(bundle.stage_tokens), "trainable_tokens": list(bundle.trainable_tokens),
        "sft_config": sft_config(bundle, out), "lora_config": lora_config(bundle, trainable_tokens=True),
        "note": "add stage_tokens to the tokenizer as special tokens (in this order) and resize the embeddings "
                "before building the trainer; trainable_token_indices are their ids then. With tied embeddings, "
                "set trainer.model.get_base_model().get_output_embeddings().bias = None after building the "
                "trainer (TRL's fused LM head reads a bias PEFT's trainable-token wrapper lacks); see "
                "docs/export-trl.md"})
    if bundle.dpo_train:
        files += [out / "dpo_train.jsonl", out / "dpo_test.jsonl", out / "trl_dpo.json"]
        write_jsonl(files[-3], dpo_rows(bundle.dpo_train))
        write_jsonl(files[-2], dpo_rows(bundle.dpo_test))
        write_json(files[-1], {
            "model": str(out / "runs" / "sft" / "merged"), "train_file": str(files[-3]),
            "eval_file": str(files[-2]), "dpo_config": dpo_config(bundle, out),
            "lora_config": lora_config(bundle, trainable_tokens=False),
            "note": "persllm's DPO trains a fresh LoRA on the SFT model merged into the base model (model), whose "
                    "own weights are the reference (ref_model=None with a LoRA)"})
    files.append(out / "export.json")
    write_json(files[-1], manifest(bundle, "trl", files[:-1]))
    return files
