"""LLaMA-Factory: sharegpt datasets (SFT mix, test set, DPO ranking, KTO), dataset_info.json, SFT and DPO YAMLs.

The YAMLs have no `template` key on purpose: LLaMA-Factory then parses the base tokenizer's own chat template, which
is the one persllm trains with; its named templates (`template: gemma`, ...) render another format. See
docs/export-llamafactory.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from persllm.export.bundle import Bundle, chat, hyper, manifest, pair_answer
from persllm.train.data import MixRecord
from persllm.types import Message, PreferencePair
from persllm.workspace import write_json, write_text

_ROLES = {"user": "human", "assistant": "gpt"}
_COLUMNS = {"messages": "conversations", "system": "system"}
NO_TEMPLATE = ("# No `template` key: LLaMA-Factory then parses the base tokenizer's chat template, the one persllm\n"
               "# trains with. A named template (e.g. `template: gemma`) renders another format: it folds the system\n"
               "# prompt into the user turn and names the assistant otherwise, so the tuned model would not match\n"
               "# persllm's prompts.\n")


def sharegpt(messages: Sequence[Message]) -> dict[str, Any]:
    """One conversation in LLaMA-Factory's sharegpt format (system prompt in its own column)."""
    turns = chat(messages)
    system = next((m["content"] for m in turns if m["role"] == "system"), "")
    return {"conversations": [{"from": _ROLES[m["role"]], "value": m["content"]} for m in turns
                              if m["role"] != "system"], "system": system}


def sft_rows(records: Sequence[MixRecord]) -> list[dict[str, Any]]:
    """The SFT mix as sharegpt rows (id, origin and kind ride along; LLaMA-Factory reads only mapped columns)."""
    return [sharegpt(r.messages) | {"id": r.source_id, "origin": r.origin, "kind": r.kind} for r in records]


def ranking_rows(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    """DPO pairs as sharegpt ranking rows: the prompt's conversation, then chosen and rejected gpt turns."""
    return [sharegpt(p.prompt) | {"chosen": {"from": "gpt", "value": pair_answer(p, "chosen")},
                                  "rejected": {"from": "gpt", "value": pair_answer(p, "rejected")},
                                  "id": p.id, "negative_type": p.negative_type} for p in pairs]


def kto_rows(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    """KTO rows (kto_tag): each distinct chosen answer once as desirable, each rejected answer as undesirable."""
    rows, seen = [], set()
    for pair in pairs:
        for side, tag in (("chosen", True), ("rejected", False)):
            key = (pair.prompt, pair_answer(pair, side), tag)
            if key in seen:
                continue
            seen.add(key)
            row = sharegpt(pair.prompt)
            row["conversations"].append({"from": "gpt", "value": pair_answer(pair, side)})
            rows.append(row | {"kto_tag": tag, "id": f"{pair.id}-{side}"})
    return rows


def _model_args(bundle: Bundle, model: str) -> dict[str, Any]:
    args: dict[str, Any] = {"model_name_or_path": model, "trust_remote_code": False}
    if bundle.stage_tokens:
        # special, like persllm's, so the tokenizer never splits them; LLaMA-Factory resizes the embeddings
        args |= {"add_special_tokens": ",".join(bundle.stage_tokens), "resize_vocab": True}
    return args


def _method(bundle: Bundle) -> dict[str, Any]:
    lora = hyper(bundle.project)["lora"]
    if lora["method"] == "full":
        return {"finetuning_type": "full"}
    targets = lora["targets"]
    method: dict[str, Any] = {"finetuning_type": "lora", "lora_rank": lora["r"], "lora_alpha": lora["alpha"],
                              "lora_dropout": lora["dropout"],
                              "lora_target": "all" if targets == "all-linear" else ",".join(targets)}
    if lora["method"] == "qlora":
        method |= {"quantization_bit": 4, "quantization_method": "bnb"}
    return method


def _train_args(stage: dict[str, Any], seed: int, bf16: bool, output_dir: Path) -> dict[str, Any]:
    args: dict[str, Any] = {
        "output_dir": str(output_dir), "overwrite_output_dir": True, "logging_steps": 1,
        "save_steps": stage["save_steps"], "report_to": "none", "plot_loss": False,
        "per_device_train_batch_size": stage["batch_size"], "gradient_accumulation_steps": stage["grad_accum"],
        "learning_rate": stage["learning_rate"], "num_train_epochs": stage["epochs"],
        "lr_scheduler_type": stage["lr_scheduler_type"],
        # a float below 1 is a share of the steps (transformers 5 replaced warmup_ratio with it)
        "warmup_steps": stage["warmup_ratio"], "weight_decay": stage["weight_decay"],
        "bf16": bf16, "seed": seed, "data_seed": seed, "disable_gradient_checkpointing": True}
    if stage.get("lr_scheduler_kwargs"):
        args["lr_scheduler_kwargs"] = stage["lr_scheduler_kwargs"]
    if stage["max_steps"] > 0:
        args["max_steps"] = stage["max_steps"]
    return args


def sft_yaml(bundle: Bundle, out: Path) -> dict[str, Any]:
    """LLaMA-Factory SFT arguments with persllm's hyper-parameters."""
    values = hyper(bundle.project)
    config = _model_args(bundle, bundle.base_model) | {"stage": "sft", "do_train": True} | _method(bundle) | {
        "dataset": f"{bundle.name}_sft", "dataset_dir": str(out), "cutoff_len": values["sft"]["max_length"],
        "overwrite_cache": True, "train_on_prompt": False, "mask_history": False}
    if bundle.sft_test:
        config |= {"eval_dataset": f"{bundle.name}_test", "per_device_eval_batch_size": values["sft"]["batch_size"],
                   "eval_strategy": "epoch"}
    return config | _train_args(values["sft"], values["seed"], bundle.bf16, out / "saves" / "sft")


def dpo_yaml(bundle: Bundle, out: Path) -> dict[str, Any]:
    """LLaMA-Factory DPO arguments: a fresh LoRA on the SFT adapter merged into the base (persllm's DPO start)."""
    values = hyper(bundle.project)
    sft_out = out / "saves" / "sft"
    full = values["lora"]["method"] == "full"
    config = _model_args(bundle, str(sft_out) if full else bundle.base_model)
    if not full:
        # create_new_adapter merges the SFT adapter first; the reference model is the merged SFT model
        config |= {"adapter_name_or_path": str(sft_out), "create_new_adapter": True}
    config |= {"stage": "dpo", "do_train": True} | _method(bundle) | {
        # pref_ftx: the chosen answers' LM loss added to DPO (dpo.sft_weight; LLaMA-Factory averages it per answer)
        "pref_beta": values["dpo"]["beta"], "pref_loss": "sigmoid", "pref_ftx": values["dpo"]["sft_weight"],
        "dataset": f"{bundle.name}_dpo", "dataset_dir": str(out), "cutoff_len": values["dpo"]["max_length"],
        "overwrite_cache": True}
    if bundle.dpo_test:
        config |= {"eval_dataset": f"{bundle.name}_dpo_test",
                   "per_device_eval_batch_size": values["dpo"]["batch_size"], "eval_strategy": "epoch"}
    return config | _train_args(values["dpo"], values["seed"], bundle.bf16, out / "saves" / "dpo")


def _yaml(head: str, config: dict[str, Any]) -> str:
    return head + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=120)


def _head(bundle: Bundle, what: str, command: str) -> str:
    rows = (f"# LLaMA-Factory {what} config written by `persllm export` for {bundle.project.name}: every\n"
            f"# hyper-parameter persllm's own {what} uses. Run: {command}\n{NO_TEMPLATE}")
    if bundle.bos_in_template_only:
        rows += ("# WARNING: this tokenizer's chat template writes its BOS token but encoding does not add it;\n"
                 "# LLaMA-Factory takes the template's prefix from encode('') and would repeat BOS before every user\n"
                 "# turn. Use a tokenizer that adds BOS when encoding (Gemma's does), or train with TRL or axolotl.\n")
    if what == "SFT":
        rows += ("# persllm also trains the embedding rows of " + ", ".join(bundle.trainable_tokens) + "\n"
                 f"# at {bundle.project.sft.token_lr_ratio:g}x the learning rate; LLaMA-Factory has no per-row "
                 "option (with stage tokens it\n# trains the whole embedding, resize_vocab); if the tuned model does "
                 "not stop, add `additional_target: embed_tokens`.\n")
    return rows


def write(bundle: Bundle, out: Path) -> list[Path]:
    """Write the LLaMA-Factory export into `out`; return the files."""
    name = bundle.name
    info: dict[str, Any] = {
        f"{name}_sft": {"file_name": f"{name}_sft.json", "formatting": "sharegpt", "columns": _COLUMNS},
        f"{name}_test": {"file_name": f"{name}_test.json", "formatting": "sharegpt", "columns": _COLUMNS},
    }
    files = [out / f"{name}_sft.json", out / f"{name}_test.json"]
    write_json(files[0], sft_rows(bundle.sft_train))
    write_json(files[1], sft_rows(bundle.sft_test))
    files.append(out / "llamafactory_sft.yaml")
    write_text(files[-1], _yaml(_head(bundle, "SFT", f"llamafactory-cli train {files[-1]}"), sft_yaml(bundle, out)))
    if bundle.dpo_train:
        ranking = {"formatting": "sharegpt", "ranking": True,
                   "columns": _COLUMNS | {"chosen": "chosen", "rejected": "rejected"}}
        info[f"{name}_dpo"] = {"file_name": f"{name}_dpo.json"} | ranking
        info[f"{name}_dpo_test"] = {"file_name": f"{name}_dpo_test.json"} | ranking
        info[f"{name}_kto"] = {"file_name": f"{name}_kto.json", "formatting": "sharegpt",
                               "columns": _COLUMNS | {"kto_tag": "kto_tag"}}
        files += [out / f"{name}_dpo.json", out / f"{name}_dpo_test.json", out / f"{name}_kto.json"]
        write_json(files[-3], ranking_rows(bundle.dpo_train))
        write_json(files[-2], ranking_rows(bundle.dpo_test))
        write_json(files[-1], kto_rows(bundle.dpo_train))
        files.append(out / "llamafactory_dpo.yaml")
        write_text(files[-1], _yaml(_head(bundle, "DPO", f"llamafactory-cli train {files[-1]} (after SFT)"),
                                    dpo_yaml(bundle, out)))
    files.append(out / "dataset_info.json")
    write_json(files[-1], info)
    files.append(out / "export.json")
    write_json(files[-1], manifest(bundle, "llamafactory", files[:-1]))
    return files
