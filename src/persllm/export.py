"""Export constructed data for other trainers: TRL (conversational), LLaMA-Factory (sharegpt) and axolotl.

Every format carries the same prompts persllm trains on (system prompt with persona and stage, temporal label, CoT
answer format), so a model tuned elsewhere behaves like one tuned by `persllm train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from persllm import template
from persllm.config import Project
from persllm.train.data import pair_record, sample_messages, to_chat
from persllm.types import Message, PreferencePair, Sample
from persllm.workspace import write_json, write_jsonl, write_text

FORMATS = ("trl", "llamafactory", "axolotl")


def trl_sft(project: Project, samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """TRL conversational language-modelling records: {"id", "messages": [...]}."""
    return [{"id": s.id, "messages": to_chat(sample_messages(project, s))} for s in samples]


def trl_dpo(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    """TRL conversational preference records: prompt / chosen / rejected message lists."""
    return [{"id": p.id, **pair_record(p), "negative_type": p.negative_type} for p in pairs]


def export(project: Project, samples: Sequence[Sample], pairs: Sequence[PreferencePair], fmt: str,
           out_dir: Path) -> list[Path]:
    """Write one format into `out_dir` (train split for training files, test split kept apart); return the files."""
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    if fmt == "trl":
        return _trl(project, train, test, pairs, out_dir)
    if fmt == "llamafactory":
        return _llamafactory(project, train, test, pairs, out_dir)
    if fmt == "axolotl":
        return _axolotl(project, train, test, pairs, out_dir)
    raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")


def _trl(project: Project, train: Sequence[Sample], test: Sequence[Sample], pairs: Sequence[PreferencePair],
         out: Path) -> list[Path]:
    files = [out / "sft_train.jsonl", out / "sft_test.jsonl"]
    write_jsonl(files[0], trl_sft(project, train))
    write_jsonl(files[1], trl_sft(project, test))
    if pairs:
        files.append(out / "dpo_train.jsonl")
        write_jsonl(files[-1], trl_dpo(pairs))
    return files


def _sharegpt(messages: Sequence[Message]) -> dict[str, Any]:
    system = next((m.content for m in messages if m.role == "system"), "")
    roles = {"user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": roles[m.role], "value": m.content} for m in messages if m.role != "system"],
            "system": system}


def _llamafactory(project: Project, train: Sequence[Sample], test: Sequence[Sample],
                  pairs: Sequence[PreferencePair], out: Path) -> list[Path]:
    name = f"persllm_{project.slug.replace('-', '_')}"
    columns = {"messages": "conversations", "system": "system"}
    info: dict[str, Any] = {
        f"{name}_sft": {"file_name": f"{name}_sft.json", "formatting": "sharegpt", "columns": columns},
        f"{name}_test": {"file_name": f"{name}_test.json", "formatting": "sharegpt", "columns": columns},
    }
    files = [out / f"{name}_sft.json", out / f"{name}_test.json"]
    write_json(files[0], [_sharegpt(sample_messages(project, s)) for s in train])
    write_json(files[1], [_sharegpt(sample_messages(project, s)) for s in test])
    if pairs:
        records = []
        for pair in pairs:
            record = _sharegpt(pair.prompt)
            record["chosen"] = {"from": "gpt", "value": pair.chosen}
            record["rejected"] = {"from": "gpt", "value": pair.rejected}
            records.append(record)
        files.append(out / f"{name}_dpo.json")
        write_json(files[-1], records)
        info[f"{name}_dpo"] = {"file_name": f"{name}_dpo.json", "formatting": "sharegpt", "ranking": True,
                               "columns": columns | {"chosen": "chosen", "rejected": "rejected"}}
    files.append(out / "dataset_info.json")
    write_json(files[-1], info)
    return files


def _axolotl(project: Project, train: Sequence[Sample], test: Sequence[Sample], pairs: Sequence[PreferencePair],
             out: Path) -> list[Path]:
    files = [out / "sft_train.jsonl", out / "sft_test.jsonl", out / "axolotl_sft.yaml"]
    write_jsonl(files[0], trl_sft(project, train))
    write_jsonl(files[1], trl_sft(project, test))
    jinja = template.chat_template(*template.TURN_MARKERS[0], training=False)
    common = {"chat_template": "jinja", "chat_template_jinja": jinja, "sequence_len": project.sft.max_length,
              "adapter": "lora" if project.sft.method != "full" else None, "lora_r": project.sft.lora_r,
              "lora_alpha": project.sft.lora_alpha, "lora_target_linear": True}
    sft = common | {"datasets": [{"path": "sft_train.jsonl", "type": "chat_template", "field_messages": "messages",
                                  "roles_to_train": ["assistant"]}],
                    "learning_rate": project.sft.learning_rate, "output_dir": "./persllm-sft"}
    write_text(files[2], _yaml_doc("SFT", sft))
    if pairs:
        records = [{"conversation": to_chat(p.prompt), "chosen": {"role": "assistant", "content": p.chosen},
                    "rejected": {"role": "assistant", "content": p.rejected}} for p in pairs]
        files += [out / "dpo_train.jsonl", out / "axolotl_dpo.yaml"]
        write_jsonl(files[-2], records)
        dpo = common | {"rl": "dpo", "rl_beta": project.dpo.beta, "learning_rate": project.dpo.learning_rate,
                        "datasets": [{"path": "dpo_train.jsonl", "type": "chat_template.default",
                                      "field_messages": "conversation", "field_chosen": "chosen",
                                      "field_rejected": "rejected"}],
                        "output_dir": "./persllm-dpo"}
        write_text(files[-1], _yaml_doc("DPO (start from the merged SFT model)", dpo))
    return files


def _yaml_doc(what: str, config: dict[str, Any]) -> str:
    head = (f"# axolotl {what} config written by persllm; add base_model (the transformers checkpoint persllm trained,\n"
            "# e.g. ~/.cache/persllm/models/gemma-3-270m-q4_k_m-hf-v1) and your hardware settings.\n")
    return head + yaml.safe_dump({k: v for k, v in config.items() if v is not None}, sort_keys=False,
                                 allow_unicode=True)
