"""OpenAI fine-tuning: chat JSONL for supervised fine-tuning, preference JSONL for DPO, and a job body.

OpenAI trains its own models with its own template, so only the data carries over (system prompt, stage labels as
text or the literal <TIME-I> strings, [Analysis] ... [Response] answers). See docs/export-openai.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persllm.export.bundle import Bundle, chat, hyper, manifest, pair_answer
from persllm.train.data import MixRecord
from persllm.types import PreferencePair
from persllm.workspace import write_json, write_jsonl


def chat_rows(records: Sequence[MixRecord]) -> list[dict[str, Any]]:
    """Chat fine-tuning lines: {"messages": [...]}, nothing else (the API rejects unknown keys)."""
    return [{"messages": chat(r.messages)} for r in records]


def preference_rows(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    """Preference fine-tuning lines: input messages, one preferred and one non-preferred assistant message."""
    return [{"input": {"messages": chat(p.prompt)},
             "preferred_output": [{"role": "assistant", "content": pair_answer(p, "chosen")}],
             "non_preferred_output": [{"role": "assistant", "content": pair_answer(p, "rejected")}]} for p in pairs]


def job(bundle: Bundle) -> dict[str, Any]:
    """Fine-tuning job bodies (POST /v1/fine_tuning/jobs) with persllm's epochs, batch size and DPO beta; the model
    and the uploaded file ids are left to fill in."""
    values = hyper(bundle.project)
    sft = {"n_epochs": max(1, round(values["sft"]["epochs"])),
           "batch_size": values["sft"]["batch_size"] * values["sft"]["grad_accum"]}
    jobs: dict[str, Any] = {"supervised": {
        "model": "<base model to tune>", "training_file": "<file id of openai_sft_train.jsonl>",
        "validation_file": "<file id of openai_sft_test.jsonl>",
        "method": {"type": "supervised", "supervised": {"hyperparameters": sft}}}}
    if bundle.dpo_train:
        dpo = {"n_epochs": max(1, round(values["dpo"]["epochs"])),
               "batch_size": values["dpo"]["batch_size"] * values["dpo"]["grad_accum"],
               "beta": values["dpo"]["beta"]}
        jobs["dpo"] = {"model": "<the supervised job's fine-tuned model>",
                       "training_file": "<file id of openai_preference_train.jsonl>",
                       "validation_file": "<file id of openai_preference_test.jsonl>",
                       "method": {"type": "dpo", "dpo": {"hyperparameters": dpo}}}
    return jobs


def write(bundle: Bundle, out: Path) -> list[Path]:
    """Write the OpenAI export into `out`; return the files."""
    files = [out / "openai_sft_train.jsonl", out / "openai_sft_test.jsonl"]
    write_jsonl(files[0], chat_rows(bundle.sft_train))
    write_jsonl(files[1], chat_rows(bundle.sft_test))
    if bundle.dpo_train:
        files += [out / "openai_preference_train.jsonl", out / "openai_preference_test.jsonl"]
        write_jsonl(files[-2], preference_rows(bundle.dpo_train))
        write_jsonl(files[-1], preference_rows(bundle.dpo_test))
    files.append(out / "openai_jobs.json")
    write_json(files[-1], job(bundle))
    files.append(out / "export.json")
    write_json(files[-1], manifest(bundle, "openai", files[:-1]))
    return files
