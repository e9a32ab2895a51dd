"""axolotl: chat_template JSONL datasets and SFT / DPO YAMLs with persllm's template, markers and hyper-parameters.

`eot_tokens` names the base template's end-of-turn marker, so axolotl trains it at the end of every assistant turn
(by default it trains the EOS token, which persllm's template never writes). See docs/export-axolotl.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from persllm.export import trl
from persllm.export.bundle import Bundle, chat, hyper, manifest, pair_answer
from persllm.types import PreferencePair
from persllm.workspace import write_json, write_jsonl, write_text

KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
MERGED = "merged"  # where `axolotl merge-lora` writes the merged SFT model, under the SFT output_dir


def dpo_rows(pairs: tuple[PreferencePair, ...]) -> list[dict[str, Any]]:
    """Pairs for axolotl's chat_template.default DPO strategy: conversation, chosen, rejected."""
    return [{"id": p.id, "negative_type": p.negative_type, "conversation": chat(p.prompt),
             "chosen": {"role": "assistant", "content": pair_answer(p, "chosen")},
             "rejected": {"role": "assistant", "content": pair_answer(p, "rejected")}} for p in pairs]


def _common(bundle: Bundle, model: str, max_length: int) -> dict[str, Any]:
    config: dict[str, Any] = {"base_model": model, "chat_template": "jinja",
                              "chat_template_jinja": bundle.chat_template, "eot_tokens": [bundle.end_marker]}
    if bundle.stage_tokens:
        # special tokens, as persllm adds them: never split, and no full-embedding modules_to_save needed
        config["special_tokens"] = {"additional_special_tokens": list(bundle.stage_tokens)}
    return config | {"sequence_len": max_length, "sample_packing": False, "pad_to_sequence_len": False}


def _adapter(bundle: Bundle, trainable_tokens: bool) -> dict[str, Any]:
    lora = hyper(bundle.project)["lora"]
    if lora["method"] == "full":
        return {}
    config: dict[str, Any] = {"adapter": "qlora" if lora["method"] == "qlora" else "lora",
                              "lora_r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"]}
    # axolotl switches its fused LoRA kernels on by itself: they skip LoRA dropout (persllm trains with it) and
    # need CUDA, so the config would neither match persllm's training nor run on CPU
    config |= {kernel: False for kernel in KERNELS}
    if lora["method"] == "qlora":
        config["load_in_4bit"] = True
    if lora["targets"] == "all-linear":
        config["lora_target_linear"] = True
    else:
        config["lora_target_modules"] = list(lora["targets"])
    tokens = trl.lora_config(bundle, trainable_tokens)
    if tokens and "trainable_token_indices" in tokens:
        # the rows persllm trains besides LoRA: turn markers and stage tokens (ids once the stage tokens are added)
        config["peft_trainable_token_indices"] = tokens["trainable_token_indices"]
    return config


def _train(stage: dict[str, Any], seed: int, output_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = {
        "micro_batch_size": stage["batch_size"], "gradient_accumulation_steps": stage["grad_accum"],
        "num_epochs": stage["epochs"], "learning_rate": stage["learning_rate"], "optimizer": "adamw_torch",
        "warmup_ratio": stage["warmup_ratio"], "weight_decay": stage["weight_decay"], "seed": seed,
        "bf16": "auto", "tf32": False, "gradient_checkpointing": False, "save_steps": stage["save_steps"],
        "logging_steps": 1, "output_dir": str(output_dir), "shuffle_merged_datasets": True}
    if stage["lr_scheduler_type"] == "cosine_with_min_lr":
        config |= {"lr_scheduler": "cosine", "cosine_min_lr_ratio": stage["lr_scheduler_kwargs"]["min_lr_rate"]}
    else:
        config["lr_scheduler"] = stage["lr_scheduler_type"]
    if stage["max_steps"] > 0:
        config["max_steps"] = stage["max_steps"]
    return config


def _sft_dataset(path: Path) -> dict[str, Any]:
    return {"path": str(path), "ds_type": "json", "split": "train", "type": "chat_template",
            "field_messages": "messages", "message_property_mappings": {"role": "role", "content": "content"},
            "roles_to_train": ["assistant"], "train_on_eos": "turn", "train_on_eot": "turn"}


def sft_yaml(bundle: Bundle, out: Path) -> dict[str, Any]:
    """axolotl SFT config with persllm's hyper-parameters."""
    values = hyper(bundle.project)
    config = _common(bundle, bundle.base_model, values["sft"]["max_length"]) | {
        "datasets": [_sft_dataset(out / "sft_train.jsonl")],
        "dataset_prepared_path": str(out / "prepared" / "sft"), "val_set_size": 0}
    if bundle.sft_test:
        config |= {"test_datasets": [_sft_dataset(out / "sft_test.jsonl")], "eval_strategy": "epoch"}
    return config | _adapter(bundle, trainable_tokens=True) | _train(values["sft"], values["seed"],
                                                                       out / "outputs" / "sft")


def _dpo_dataset(path: Path) -> dict[str, Any]:
    return {"path": str(path), "ds_type": "json", "split": "train", "type": "chat_template.default",
            "field_messages": "conversation", "field_chosen": "chosen", "field_rejected": "rejected",
            "message_property_mappings": {"role": "role", "content": "content"}}


def dpo_yaml(bundle: Bundle, out: Path) -> dict[str, Any]:
    """axolotl DPO config: a fresh LoRA on the merged SFT model (`axolotl merge-lora` of the SFT run)."""
    values = hyper(bundle.project)
    sft_out = out / "outputs" / "sft"
    model = sft_out if values["lora"]["method"] == "full" else sft_out / MERGED
    config = _common(bundle, str(model), values["dpo"]["max_length"])
    config.pop("special_tokens", None)  # the merged SFT model's tokenizer has the stage tokens already
    config |= {"rl": "dpo", "rl_beta": values["dpo"]["beta"], "datasets": [_dpo_dataset(out / "dpo_train.jsonl")],
               "dataset_prepared_path": str(out / "prepared" / "dpo"), "val_set_size": 0}
    if values["dpo"]["sft_weight"] > 0:  # DPO plus the chosen answers' LM loss, as TRL's loss types (dpo.sft_weight)
        config |= {"dpo_loss_type": ["sigmoid", "sft"], "dpo_loss_weights": [1.0, values["dpo"]["sft_weight"]]}
    if bundle.dpo_test:
        config |= {"test_datasets": [_dpo_dataset(out / "dpo_test.jsonl")], "eval_strategy": "epoch"}
    return config | _adapter(bundle, trainable_tokens=False) | _train(values["dpo"], values["seed"],
                                                                        out / "outputs" / "dpo")


def _yaml(head: str, config: dict[str, Any]) -> str:
    return head + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=120)


def write(bundle: Bundle, out: Path) -> list[Path]:
    """Write the axolotl export into `out`; return the files."""
    files = [out / "sft_train.jsonl", out / "sft_test.jsonl", out / "axolotl_sft.yaml"]
    write_jsonl(files[0], trl.sft_rows(bundle.sft_train))
    write_jsonl(files[1], trl.sft_rows(bundle.sft_test))
    head = (f"# axolotl SFT config written by `persllm export` for {bundle.project.name}: every hyper-parameter\n"
            f"# persllm's SFT uses, with the base model's template and end-of-turn marker. Run: axolotl train "
            f"{files[2]}\n")
    write_text(files[2], _yaml(head, sft_yaml(bundle, out)))
    if bundle.dpo_train:
        files += [out / "dpo_train.jsonl", out / "dpo_test.jsonl", out / "axolotl_dpo.yaml"]
        write_jsonl(files[-3], dpo_rows(bundle.dpo_train))
        write_jsonl(files[-2], dpo_rows(bundle.dpo_test))
        head = (f"# axolotl DPO config written by `persllm export` for {bundle.project.name}. persllm's DPO trains a "
                "fresh LoRA on the\n# SFT model merged into the base; first run: axolotl merge-lora "
                f"{files[2]}\n# then: axolotl train {files[-1]}\n")
        write_text(files[-1], _yaml(head, dpo_yaml(bundle, out)))
    files.append(out / "export.json")
    write_json(files[-1], manifest(bundle, "axolotl", files[:-1]))
    return files
