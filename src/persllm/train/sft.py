"""Supervised fine-tuning on personified CoT data mixed with general conversations (TRL SFTTrainer + PEFT)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm import dist
from persllm.config import Project, resolved_dict
from persllm.decoding import Repetition
from persllm.errors import DataError
from persllm.general import GeneralSource
from persllm.progress import NULL, Progress
from persllm.train import _model
from persllm.train.data import answer_text, build_sft_records, sample_prompt
from persllm.types import Message, Sample
from persllm.workspace import atomic_dir, atomic_path, write_json, write_jsonl

log = logging.getLogger(__name__)

# Cosine decay to a 10% floor (the paper's schedule); exports hand the same settings to the other trainers.
SFT_SCHEDULER = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}

RUN_FILE = "persllm_run.json"  # fingerprint of the run the checkpoints belong to
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_METRIC_KEYS = ("loss", "learning_rate", "grad_norm", "epoch", "mean_token_accuracy", "entropy",
                "num_input_tokens_seen")
SMOKE_PROMPTS = 3
OTHER_RANK_SMOKE = {"ok": True, "skipped": "runs on rank 0 only", "outputs": []}
# Generating on rank 0 alone would hang on weights sharded across processes; `persllm eval` checks the result.
SHARDED_SMOKE = {"ok": True, "skipped": "weights sharded by ZeRO-3/FSDP; run `persllm eval`", "outputs": []}


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
        budget = _model.smoke_budget(run.tokenizer, [answer_text(project, s.analysis, s.response) for s in picked])
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
    fast = _model.enable_fast_cpu_loss()
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


# -- shared by SFT and DPO ---------------------------------------------------------------------------------------
def use_bf16() -> bool:
    """Whether persllm trains in bf16: on a CUDA GPU that has it (bf16 is ~10x slower on AVX2 CPUs)."""
    return _model.use_cuda() and _bf16_supported()


def common_args(project: Project, ckpt_dir: Path, *, learning_rate: float, epochs: float, max_steps: int,
                batch_size: int, grad_accum: int, save_steps: int, warmup: float,
                weight_decay: float) -> dict[str, Any]:
    """TrainingArguments both trainers share: CPU-safe precision, per-step logs, checkpoints for resuming."""
    cuda = _model.use_cuda()
    return {
        "output_dir": str(ckpt_dir), "seed": project.seed, "data_seed": project.seed,
        "learning_rate": learning_rate, "num_train_epochs": epochs, "max_steps": max_steps,
        "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": grad_accum,
        "warmup_steps": warmup, "weight_decay": weight_decay,
        # TRL defaults bf16=True and gradient checkpointing on: bf16 is ~10x slower on AVX2 CPUs, GC only saves RAM.
        "bf16": use_bf16(), "fp16": False, "use_cpu": not cuda, _checkpointing_arg(): False,
        "save_strategy": "steps", "save_steps": max(1, save_steps), "save_total_limit": 2,
        "logging_strategy": "steps", "logging_steps": 1, "report_to": "none", "disable_tqdm": True,
        "dataloader_num_workers": 0, "include_num_input_tokens_seen": "non_padding",
        # Multi-process runs: every LoRA/trainable-token parameter takes part in each step, so DDP can skip the
        # unused-parameter search it would otherwise do (and warn about) on every backward pass.
        "ddp_find_unused_parameters": False,
    }


def _checkpointing_arg() -> str:
    """transformers 5.23 renamed gradient_checkpointing to activation_checkpointing (the old name warns)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def end_of_turn(tokenizer: Any) -> str:
    """The chat template's end-of-turn marker, which ends every trained assistant turn."""
    from persllm import template

    return template.markers_for(tokenizer.get_vocab())[1]


def conversation_tokens(tokenizer: Any, messages: Sequence[dict[str, str]]) -> int:
    """Tokens of a conversation rendered with the tokenizer's chat template (what max_length is compared with)."""
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=False)
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def drop_too_long(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Drop conversations over max_length tokens: TRL would cut their ends, end-of-turn token included."""
    kept = [record for record in records if conversation_tokens(tokenizer, record["messages"]) <= max_length]
    if len(kept) < len(records):
        log.warning("dropped %d of %d conversations longer than max_length=%d tokens",
                    len(records) - len(kept), len(records), max_length)
    return kept, len(records) - len(kept)


def run_fingerprint(stage: str, *parts: Any) -> str:
    """Hash of everything a run's checkpoints depend on; checkpoints of another run are never resumed."""
    payload = json.dumps([stage, *parts], sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def prepare_checkpoints(ckpt_dir: Path, fingerprint: str, resume: bool, progress: Progress) -> str | None:
    """The newest complete checkpoint of this same run when resuming; stale or unwanted checkpoints are removed.

    Under `accelerate launch` every rank decides from the same files before rank 0 deletes or writes any.
    """
    meta = ckpt_dir / RUN_FILE
    discard = False
    if ckpt_dir.exists():
        try:
            same = json.loads(meta.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
        except (OSError, ValueError, AttributeError):
            same = False
        discard = not (resume and same)
    found = newest_checkpoint(ckpt_dir) if resume and not discard else None
    dist.barrier()
    if dist.is_main_process():
        if discard:
            progress.note(f"discarding checkpoints in {ckpt_dir} ("
                          + ("--no-resume" if not resume else "inputs or settings changed") + ")")
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(meta, {"fingerprint": fingerprint})
    dist.barrier()
    if found is not None:
        progress.note(f"resuming from {found.name}")
    return str(found) if found is not None else None


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    """Highest-step checkpoint that was written completely (trainer_state.json is saved last)."""
    best: tuple[int, Path] | None = None
    for path in ckpt_dir.iterdir() if ckpt_dir.is_dir() else ():
        match = _CHECKPOINT.match(path.name)
        if match and (path / "trainer_state.json").is_file() and (best is None or int(match[1]) > best[0]):
            best = (int(match[1]), path)
    return best[1] if best else None


def progress_callback(progress: Progress, description: str) -> Any:
    """A TrainerCallback advancing one progress Task per optimizer step (resumed steps count as done)."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self) -> None:
            self.task = None
            self.seen = 0
            self.first_step: int | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.task = progress.task(description, total=state.max_steps)
            self.first_step = self.seen = state.global_step
            if self.seen:
                self.task.advance(self.seen)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.task is not None and state.global_step > self.seen:
                self.task.advance(state.global_step - self.seen)
                self.seen = state.global_step

        def close(self) -> None:
            if self.task is not None:
                self.task.close()
                self.task = None

    return _Progress()


GROUP_BATCHES = 50  # a mega-batch of this many batches is sorted by length before it is cut into batches


def length_grouped(trainer_cls: type) -> type:
    """Trainer subclass whose batches hold conversations (or pairs) of similar length, so they pad little.

    Every record is still seen once per epoch; only the order changes (see LengthGroupedBatches). With one record
    per batch there is nothing to pad and the trainer's own sampler is kept.
    """

    class Grouped(trainer_cls):  # type: ignore[valid-type, misc]
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = self.train_dataset if train_dataset is None else train_dataset
            lengths = row_lengths(dataset) if self.args.per_device_train_batch_size > 1 else None
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedBatches(lengths, self.args.per_device_train_batch_size, seed)

    Grouped.__name__ = Grouped.__qualname__ = f"Grouped{trainer_cls.__name__}"
    return Grouped


def row_lengths(dataset: Any) -> list[int] | None:
    """Padded length of each tokenized row: SFT input_ids, or DPO prompt plus the longer answer; None if unknown."""
    columns = set(getattr(dataset, "column_names", None) or ())
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:
        return [len(p) + max(len(c), len(r)) for p, c, r in zip(
            dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]
    if "input_ids" in columns:
        return [len(ids) for ids in dataset["input_ids"]]
    return None


class LengthGroupedBatches:
    """Sampler: a seeded shuffle cut into mega-batches of GROUP_BATCHES batches, each sorted by length and cut into
    batches, whose order is then shuffled again (the short remainder batch stays last, where the loader expects it).

    The order depends only on the seed and the epoch (`set_epoch`), so a resumed run skips exactly the batches it
    trained before. Under `accelerate launch` each process takes whole batches of it, as with any sampler.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = GROUP_BATCHES) -> None:
        self.lengths, self.batch_size, self.seed, self.group = list(lengths), batch_size, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        return iter(self.order())

    def order(self) -> list[int]:
        """This epoch's indices."""
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shuffled = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.group
        batches: list[list[int]] = []
        for start in range(0, len(shuffled), size):
            chunk = sorted(shuffled[start:start + size], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        picked = torch.randperm(len(batches), generator=generator).tolist()
        return [i for b in [*(batches[p] for p in picked), *tail] for i in b]


def lean_save(trainer_cls: type) -> type:
    """Trainer subclass whose checkpoints hold only the adapter, never the full (resized) embedding matrix.

    PEFT's default saves the whole embedding when the vocabulary grew (time tokens): 670 MB per checkpoint for
    Gemma's 262k vocabulary. The new rows are already in the adapter as trainable tokens.
    """

    class Lean(trainer_cls):  # type: ignore[valid-type, misc]
        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            import torch
            from peft import PeftModel

            if not isinstance(self.model, PeftModel):
                return super()._save(output_dir, state_dict)
            if not self.args.should_save:  # multi-process: rank 0 writes (a sharded state_dict is gathered already)
                return None
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            return None

    Lean.__name__ = Lean.__qualname__ = f"Lean{trainer_cls.__name__}"
    return Lean


def finish_setup(trainer: Any, token_lr_ratio: float = 1.0) -> None:
    """Trainer tweaks after construction: no printed logs, TRL's fused head working with trainable tokens, and the
    token rows' own learning rate."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # library code never prints; logs go to metrics.jsonl
    _model.patch_tied_head(trainer.model)
    _model.cheap_trainable_tokens(trainer.model)
    if token_lr_ratio != 1.0:
        _token_rows_lr(trainer, token_lr_ratio)


def _token_rows_lr(trainer: Any, ratio: float) -> None:
    """Give the trainable token rows their own optimizer group at `ratio` times the learning rate.

    At the adapter's 2e-4 a demo's 30 Adam steps moved Gemma's untrained <end_of_turn> row 5.6% of its norm: enough
    for some prompts to stop, not all. The scheduler scales each group from its own initial rate, so warmup and
    decay apply to both groups alike.
    """
    original = trainer.create_optimizer

    def create_optimizer(*args: Any, **kwargs: Any) -> Any:
        optimizer = original(*args, **kwargs)
        rows = {id(p) for n, p in trainer.model.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad}
        if not rows or getattr(optimizer, "_persllm_token_group", False):
            return optimizer
        moved = []
        for group in optimizer.param_groups:
            taken = [p for p in group["params"] if id(p) in rows]
            if taken:
                group["params"] = [p for p in group["params"] if id(p) not in rows]
                moved.append({**{k: v for k, v in group.items() if k != "params"}, "params": taken,
                              "lr": group["lr"] * ratio})
        for group in moved:
            optimizer.add_param_group(group)
        optimizer._persllm_token_group = True
        return optimizer

    trainer.create_optimizer = create_optimizer


def stack_meta(target: Path, below: Sequence[Path], base: str) -> dict[str, Any]:
    """persllm_adapter.json content: adapters (relative to `target`) merged before this one, and the base model."""
    return {"stack": [os.path.relpath(Path(p).resolve(), Path(target).resolve()) for p in below], "base": base}


def smoke_repetition(project: Project, model: Any) -> Repetition:
    """The decoding the persona's answers get from this model (its size picks the defaults), for the smoke test."""
    from persllm.variants import project_repetition

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return project_repetition(project, sum(p.numel() for p in base.parameters()))


def finish_run(trainer: Any, tokenizer: Any, out_dir: Path, ckpt_dir: Path, target: Path,
               stack: dict[str, Any] | None, prompts: Sequence[Sequence[Message]], keep_cot: bool,
               max_new_tokens: int = _model.SMOKE_NEW_TOKENS,
               repetition: Repetition | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """After training: save the result, metrics, curves and smoke test, drop the checkpoints; (metrics, smoke).

    Call on every rank: a sharded model is gathered from all of them, then rank 0 alone writes.
    """
    state_dict = gathered_state_dict(trainer)
    if not dist.is_main_process():
        return metric_rows(trainer.state.log_history), OTHER_RANK_SMOKE
    save_final(trainer.model, tokenizer, target, stack, state_dict)
    metrics = write_metrics(out_dir, trainer.state.log_history)
    smoke = (SHARDED_SMOKE if state_dict is not None
             else _model.smoke_test(trainer.model, tokenizer, prompts, keep_cot, max_new_tokens=max_new_tokens,
                                    repetition=repetition))
    write_json(out_dir / "smoke.json", smoke)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the saved model is the result
    return metrics, smoke


def sharded(trainer: Any) -> bool:
    """True when DeepSpeed ZeRO-3 or FSDP shards the weights across processes (no rank holds the whole model)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        engine = getattr(trainer, "deepspeed", None)
        config = getattr(engine, "config", None) or {}
        return config.get("zero_optimization", {}).get("stage") == 3
    return False


def gathered_state_dict(trainer: Any) -> dict[str, Any] | None:
    """The trained weights collected from every process for saving (collective: call on all ranks).

    None when each process holds the whole model anyway (single process, DDP, ZeRO-1/2), so the model saves itself.
    """
    if not sharded(trainer):
        return None
    if getattr(trainer, "is_deepspeed_enabled", False):
        from peft import PeftModel

        if isinstance(trainer.model, PeftModel):  # only the adapter is needed: skip gathering the frozen base
            return trainer.deepspeed._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        return trainer.accelerator.get_state_dict(trainer.deepspeed)
    return trainer.accelerator.get_state_dict(trainer.model)


def save_final(model: Any, tokenizer: Any, target: Path, stack: dict[str, Any] | None,
               state_dict: dict[str, Any] | None = None) -> None:
    """Write the adapter (or full model) with its tokenizer into a temp dir, then move it into place."""
    from persllm.backends.hf import ADAPTER_STACK_FILE

    with atomic_dir(target) as tmp:
        if hasattr(model, "peft_config"):
            model.save_pretrained(tmp, state_dict=state_dict, save_embedding_layers=False)
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if stack is not None:
            write_json(tmp / ADAPTER_STACK_FILE, stack)


def write_metrics(out_dir: Path, log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl (one line per logged optimizer step, resumed steps included) and curves.png."""
    rows = metric_rows(log_history)
    write_jsonl(out_dir / "metrics.jsonl", rows)
    plot_curves(out_dir / "curves.png", rows)
    return rows


def metric_rows(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged optimizer step with the curves' metrics."""
    rows = []
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        row: dict[str, Any] = {"step": int(entry["step"])}
        for key, value in entry.items():
            if (key in _METRIC_KEYS or key.startswith(("rewards/", "logps/"))) and isinstance(value, (int, float)):
                row[key] = value
        rows.append(row)
    return rows


def plot_curves(path: Path, rows: Sequence[dict[str, Any]]) -> bool:
    """Loss (and DPO reward margin/accuracy) against step as a PNG; False when nothing was logged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # core dependency; Agg needs no display
    from matplotlib.figure import Figure

    if not rows:
        return False
    panels = [k for k in ("loss", "rewards/margins", "rewards/accuracies", "learning_rate")
              if any(k in r for r in rows)]
    figure = Figure(figsize=(4 * len(panels), 3.2))
    FigureCanvasAgg(figure)
    for i, key in enumerate(panels, 1):
        axis = figure.add_subplot(1, len(panels), i)
        points = [(r["step"], r[key]) for r in rows if key in r]
        axis.plot([p[0] for p in points], [p[1] for p in points])
        axis.set_title(key)
        axis.set_xlabel("step")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    return True


def smoke_samples(samples: Sequence[Sample], seed: int) -> list[Sample]:
    """A few training samples, one per stage first, for the post-training generation check."""
    train = sorted((s for s in samples if s.split == "train"), key=lambda s: (s.stage, s.id))
    picked: list[Sample] = []
    for stage in dict.fromkeys(s.stage for s in train):
        picked.append(next(s for s in train if s.stage == stage))
    picked += [s for s in train if s not in picked]
    return picked[:SMOKE_PROMPTS]


def trainable_parameters(model: Any) -> int:
    """Number of parameters the optimizer updates."""
    # ZeRO-3 leaves each process an empty shard of every parameter; ds_numel is the full size
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def run_stats(trainer: Any, result: Any, metrics: Sequence[dict[str, Any]], smoke: dict[str, Any],
              started: float, checkpoint: str | None, fast: bool) -> dict[str, Any]:
    """Stats shared by SFT and DPO runs."""
    train_metrics = dict(getattr(result, "metrics", {}) or {})
    runtime = float(train_metrics.get("train_runtime") or 0.0)
    resumed = int(_CHECKPOINT.match(Path(checkpoint).name)[1]) if checkpoint else 0
    tokens_session = _session_tokens(trainer, resumed)
    return {
        "steps": int(trainer.state.global_step), "resumed_from_step": resumed,
        "train_loss": train_metrics.get("train_loss"),
        "final_loss": next((r["loss"] for r in reversed(metrics) if "loss" in r), None),
        "tokens": int(tokens_session), "train_seconds": round(runtime, 2),
        "tokens_per_second": round(tokens_session / runtime, 1) if runtime > 0 else None,
        "seconds": round(time.monotonic() - started, 2), "fast_cpu_loss": fast,
        "smoke": smoke, "smoke_warning": not smoke.get("ok", False),
    }


def _session_tokens(trainer: Any, resumed: int) -> int:
    """Tokens seen since the resumed checkpoint (its log line carries the count seen until then)."""
    before = 0
    for entry in trainer.state.log_history:
        if entry.get("step", 0) <= resumed and "num_input_tokens_seen" in entry:
            before = entry["num_input_tokens_seen"]
    return int(trainer.state.num_input_tokens_seen - before)
