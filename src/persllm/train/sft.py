"""Supervised fine-tuning on personified CoT data mixed with general conversations (TRL SFTTrainer + PEFT).

The recipe: prepare_sft checks the method, builds the data mix, loads the model and builds the trainer; train_sft
trains it, saves the result and runs the smoke test. What SFT shares with DPO, and persllm's hooks into TRL and PEFT,
are in _trainer.py; loading the model is _model.py.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm.config import Project, resolved_dict
from persllm.errors import DataError
from persllm.general import GeneralSource
from persllm.progress import NULL, Progress
from persllm.train import _model
from persllm.train._trainer import (
    SMOKE_PROMPTS,
    common_args,
    conversation_tokens,
    enable_fast_cpu_loss,
    end_of_turn,
    finish_run,
    finish_setup,
    lean_save,
    length_grouped,
    prepare_checkpoints,
    progress_callback,
    run_fingerprint,
    run_stats,
    smoke_budget,
    smoke_repetition,
    stack_meta,
    trainable_parameters,
)
from persllm.train.data import answer_text, build_sft_records, sample_prompt
from persllm.types import Message, Sample

log = logging.getLogger(__name__)

# Cosine decay to a 10% floor (the paper's schedule); exports hand the same settings to the other trainers.
SFT_SCHEDULER: dict[str, Any] = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}


def train_sft(project: Project, samples: Sequence[Sample], general: Sequence[Sequence[Message]], out_dir: Path,
              progress: Progress = NULL, resume: bool = True, *, callbacks: Sequence[Any] = (),
              general_source: GeneralSource | None = None) -> dict[str, Any]:
    """Fine-tune the base model; write adapter/ (or model/), metrics.jsonl, curves.png, smoke.json; return stats.

    `callbacks` are extra transformers TrainerCallbacks (tests use one to interrupt a run); `general_source` (what
    load_general says about `general`) is reported in the stats' samples.
    """
    started = time.monotonic()
    sft = project.sft
    with _model.session():
        run = prepare_sft(project, samples, general, out_dir, progress, resume, callbacks=callbacks,
                          general_source=general_source)
        trainer = run.trainer
        try:
            result = trainer.train(resume_from_checkpoint=run.checkpoint)
        finally:
            run.tracker.close()
        target = run.out_dir / ("model" if sft.method == "full" else "adapter")
        picked = smoke_samples(samples, project.seed)
        prompts = [sample_prompt(project, s) for s in picked]
        budget = smoke_budget(run.tokenizer, [answer_text(project, s.analysis, s.response) for s in picked])
        stack = None if sft.method == "full" else stack_meta(target, run.loaded.below, run.loaded.base_path)
        metrics, smoke = finish_run(trainer, run.tokenizer, run.out_dir, run.ckpt_dir, target, stack, prompts,
                                    sft.keep_cot, max_new_tokens=budget,
                                    repetition=smoke_repetition(project, run.loaded.model))
    return run_stats(trainer, result, metrics, smoke, started, run.checkpoint, run.fast) | {
        "method": sft.method, "samples": run.counts, "output": str(target),
        "trainable_parameters": trainable_parameters(trainer.model)}


@dataclass
class SFTRun:
    """A configured SFT trainer and what it was built from (prepare_sft's result)."""

    trainer: Any
    tokenizer: Any  # the tokenizer saved with the adapter (the trainer works on a copy)
    loaded: _model.Loaded
    counts: dict[str, Any]
    out_dir: Path
    ckpt_dir: Path
    checkpoint: str | None  # checkpoint training resumes from
    tracker: Any
    fast: bool  # TRL CPU speed patch active


def prepare_sft(project: Project, samples: Sequence[Sample], general: Sequence[Sequence[Message]], out_dir: Path,
                progress: Progress = NULL, resume: bool = True, *, callbacks: Sequence[Any] = (),
                general_source: GeneralSource | None = None) -> SFTRun:
    """Load the model, build the mixed data and the SFTTrainer, find the checkpoint to resume from; train nothing."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sft = project.sft
    _model.check_method(sft.method)
    records, counts = build_sft_records(project, samples, general, general_source)
    if not counts["personified"]:
        raise DataError("no personified training samples (split 'train'); run `persllm construct` first "
                        "and check that it produced train samples")
    fast = enable_fast_cpu_loss()
    loaded = _model.load_base(project, quantize=sft.method == "qlora")
    records, counts["dropped_too_long"] = drop_too_long(records, loaded.tokenizer, sft.max_length)
    if not records:
        raise DataError(f"every training conversation is longer than sft.max_length={sft.max_length} tokens; "
                        "raise sft.max_length")
    model = loaded.model
    if sft.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_config = None if sft.method == "full" else _model.lora_config(sft, loaded.token_rows, model)
    ckpt_dir = out_dir / "checkpoints"
    fingerprint = run_fingerprint("sft", resolved_dict(sft), project.seed, loaded.base_path,
                                  [str(p) for p in loaded.below], records,
                                  {"token_rows": loaded.token_rows} if peft_config is not None else {})
    checkpoint = prepare_checkpoints(ckpt_dir, fingerprint, resume, progress)
    args = SFTConfig(
        **common_args(project, ckpt_dir, learning_rate=sft.learning_rate, epochs=sft.epochs,
                      max_steps=sft.max_steps, batch_size=sft.batch_size, grad_accum=sft.grad_accum,
                      save_steps=sft.save_steps, warmup=sft.warmup_ratio, weight_decay=sft.weight_decay),
        max_length=sft.max_length, assistant_only_loss=True, eos_token=end_of_turn(loaded.tokenizer),
        **SFT_SCHEDULER)
    tracker = progress_callback(progress, "SFT")
    # The trainer gets its own tokenizer: it rewrites eos_token, which must not leak into the saved one.
    trainer = lean_save(length_grouped(SFTTrainer))(
        model=model, args=args, train_dataset=Dataset.from_list(records),
        processing_class=copy.deepcopy(loaded.tokenizer), peft_config=peft_config, callbacks=[tracker, *callbacks])
    finish_setup(trainer, sft.token_lr_ratio if sft.method != "full" else 1.0)
    return SFTRun(trainer=trainer, tokenizer=loaded.tokenizer, loaded=loaded, counts=counts, out_dir=out_dir,
                  ckpt_dir=ckpt_dir, checkpoint=checkpoint, tracker=tracker, fast=fast)


def drop_too_long(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Drop conversations over max_length tokens: TRL would cut their ends, end-of-turn token included."""
    kept = [record for record in records if conversation_tokens(tokenizer, record["messages"]) <= max_length]
    if len(kept) < len(records):
        log.warning("dropped %d of %d conversations longer than max_length=%d tokens",
                    len(records) - len(kept), len(records), max_length)
    return kept, len(records) - len(kept)


def smoke_samples(samples: Sequence[Sample], seed: int) -> list[Sample]:
    """A few training samples, one per stage first, for the post-training generation check."""
    train = sorted((s for s in samples if s.split == "train"), key=lambda s: (s.stage, s.id))
    picked: list[Sample] = []
    for stage in dict.fromkeys(s.stage for s in train):
        picked.append(next(s for s in train if s.stage == stage))
    picked += [s for s in train if s not in picked]
    return picked[:SMOKE_PROMPTS]
