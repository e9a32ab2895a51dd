"""Automated DPO on top of the SFT model: a fresh LoRA on the merged SFT weights, so the reference IS the SFT model.

The recipe (train_dpo): check the method, load the merged SFT result, drop over-long pairs, build the trainer, check
at step 0 that the pairs can teach anything, train, save the result and run the smoke test. What DPO shares with SFT,
and persllm's hooks into TRL and PEFT, are in _trainer.py; loading the model is _model.py.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm import dist
from persllm.config import Project, resolved_dict
from persllm.errors import DataError, PersllmError
from persllm.progress import NULL, Progress
from persllm.train import _model
from persllm.train._trainer import (
    SMOKE_PROMPTS,
    common_args,
    conversation_tokens,
    enable_fast_cpu_loss,
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
from persllm.train.data import pair_record
from persllm.types import PreferencePair

log = logging.getLogger(__name__)

SANITY_BATCHES = 4
SANITY_MIN_LOSS = 0.01
SANITY_REPORT = 4
DPO_WARMUP = 0.1  # share of steps; DPOConfig has no warmup setting


def train_dpo(project: Project, pairs: Sequence[PreferencePair], sft_dir: Path, out_dir: Path,
              progress: Progress = NULL, resume: bool = True, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train DPO on `pairs` from the SFT result in sft_dir; write adapter/ (or model/), metrics, curves, smoke."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    started = time.monotonic()
    out_dir, sft_dir = Path(out_dir), Path(sft_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dpo, method = project.dpo, project.sft.method
    _model.check_method(method)
    if not pairs:
        raise DataError("no DPO pairs to train on; build them with build_pairs (check construct.negatives "
                        "and dpo.negative_types)")
    # only QLoRA needs the merged SFT model on disk; one copy per process under `accelerate launch`
    scratch = out_dir / (f".sft-merged-rank{dist.rank()}" if dist.is_distributed() else ".sft-merged")
    with _model.session(), _removed_after(scratch):
        fast = enable_fast_cpu_loss()
        start = load_sft_result(project, sft_dir, scratch)
        tokenizer, model = start.tokenizer, start.model
        records, too_long = drop_too_long_pairs([pair_record(p) for p in pairs], tokenizer, dpo.max_length)
        if not records:
            raise DataError(f"every DPO pair is longer than dpo.max_length={dpo.max_length} tokens; "
                            "raise dpo.max_length")
        full = method == "full"
        # Full fine-tuning needs an explicit frozen copy: TRL would otherwise reload the reference from the
        # in-memory model's (empty or base) name. With LoRA the reference is the same weights, adapter disabled.
        ref_model = copy.deepcopy(model).eval() if full else None
        peft_config = None if full else _model.lora_config(project.sft)
        ckpt_dir = out_dir / "checkpoints"
        fingerprint = run_fingerprint("dpo", resolved_dict(dpo), resolved_dict(project.sft), project.seed,
                                      start.base_path, _dir_signature(start.source), records)
        checkpoint = prepare_checkpoints(ckpt_dir, fingerprint, resume, progress)
        args = DPOConfig(
            **common_args(project, ckpt_dir, learning_rate=dpo.learning_rate, epochs=dpo.epochs,
                          max_steps=dpo.max_steps, batch_size=dpo.batch_size, grad_accum=dpo.grad_accum,
                          save_steps=dpo.save_steps, warmup=DPO_WARMUP, weight_decay=0.0),
            beta=dpo.beta, max_length=dpo.max_length, **loss_args(dpo.sft_weight))
        tracker = progress_callback(progress, "DPO")
        trainer = lean_save(length_grouped(DPOTrainer))(
            model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(records),
            processing_class=copy.deepcopy(tokenizer), peft_config=peft_config, callbacks=[tracker, *callbacks])
        finish_setup(trainer)
        # A resumed run is past step 0, where a low loss is the goal rather than an alarm.
        sanity = step0_check(trainer, dpo.beta) if checkpoint is None else {"skipped": "resumed"}
        try:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        finally:
            tracker.close()
        target = out_dir / ("model" if full else "adapter")
        stack = None if full else stack_meta(target, start.stack, start.base_path)
        firsts: dict[Any, PreferencePair] = {}
        for pair in pairs:
            firsts.setdefault(pair.prompt, pair)
        smoke_pairs = list(firsts.values())[:SMOKE_PROMPTS]
        prompts = [list(p.prompt) for p in smoke_pairs]
        budget = smoke_budget(tokenizer, [p.chosen for p in smoke_pairs])
        metrics, smoke = finish_run(trainer, tokenizer, out_dir, ckpt_dir, target, stack, prompts,
                                    project.sft.keep_cot, max_new_tokens=budget,
                                    repetition=smoke_repetition(project, trainer.model))
    last = metrics[-1] if metrics else {}
    return run_stats(trainer, result, metrics, smoke, started, checkpoint, fast) | {
        "method": method, "pairs": len(records), "dropped_too_long": too_long, "sanity": sanity,
        "reward_margin": last.get("rewards/margins"), "reward_accuracy": last.get("rewards/accuracies"),
        "output": str(target), "trainable_parameters": trainable_parameters(trainer.model)}


def loss_args(sft_weight: float) -> dict[str, Any]:
    """TRL's loss settings: plain sigmoid DPO, or DPO plus the chosen answers' LM loss (TRL's "sft" loss type)."""
    if sft_weight <= 0:
        return {}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]}


@contextlib.contextmanager
def _removed_after(path: Path) -> Iterator[None]:
    """Delete a scratch directory when the block ends, however it ends."""
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class SFTStart:
    """The merged SFT model DPO starts from, and where it came from."""

    model: Any
    tokenizer: Any
    base_path: str  # what HFBackend loads before the stack
    source: Path  # the SFT adapter or model directory
    stack: list[Path]  # adapters the DPO adapter sits on (persllm_adapter.json)


def load_sft_result(project: Project, sft_dir: Path, scratch: Path) -> SFTStart:
    """Base + merged SFT adapter stack (adapter/), or the fully fine-tuned SFT model (model/)."""
    from persllm.backends import base_model_path
    from persllm.backends.hf import adapter_stack, merge_adapters

    adapter, full = sft_dir / "adapter", sft_dir / "model"
    method = project.sft.method
    if (adapter / "adapter_config.json").is_file():
        if method == "full":
            raise DataError(f"{sft_dir} holds a LoRA adapter but sft.method=full; re-run SFT with this config")
        base = base_model_path(project.base_model)
        tokenizer, _ = _model.load_tokenizer(adapter, project)
        model = merge_adapters(_model.load_model(base, tokenizer), adapter_stack(adapter))
        if method == "qlora":
            model = _requantize(model, tokenizer, scratch)
        return SFTStart(model, tokenizer, base, adapter, [adapter])
    if (full / "config.json").is_file():
        if method != "full":
            raise DataError(f"{sft_dir} holds a fully fine-tuned model but sft.method={method}; "
                            "re-run SFT with this config")
        tokenizer, _ = _model.load_tokenizer(full, project)
        return SFTStart(_model.load_model(full, tokenizer), tokenizer, str(full), full, [])
    raise DataError(f"no SFT result in {sft_dir} (expected adapter/ or model/); run SFT first (`persllm train`)")


def _requantize(model: Any, tokenizer: Any, scratch: Path) -> Any:
    """QLoRA: the merged SFT model, saved once and reloaded in 4 bits (a LoRA cannot be merged into 4-bit weights)."""
    from peft import prepare_model_for_kbit_training

    if scratch.exists():
        shutil.rmtree(scratch)
    model.save_pretrained(scratch)
    del model
    quantized = _model.load_model(scratch, tokenizer, quantize=True)
    return prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)


def pair_tokens(tokenizer: Any, record: dict[str, Any]) -> int:
    """Tokens of a pair's prompt plus its longer answer, rendered with the chat template (compared with max_length)."""
    return max(conversation_tokens(tokenizer, record["prompt"] + record[side]) for side in ("chosen", "rejected"))


def drop_too_long_pairs(records: list[dict[str, Any]], tokenizer: Any,
                        max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Drop pairs whose prompt + longer answer exceeds max_length (truncation would cut the end-of-turn)."""
    kept = [record for record in records if pair_tokens(tokenizer, record) <= max_length]
    if len(kept) < len(records):
        log.warning("dropped %d of %d DPO pairs longer than max_length=%d tokens",
                    len(records) - len(kept), len(records), max_length)
    return kept, len(records) - len(kept)


def _dir_signature(path: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and mtimes of a directory's files: changes when the SFT result is retrained."""
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in path.rglob("*") if p.is_file())


# -- step-0 sanity alarm ---------------------------------------------------------------------------------------
def step0_check(trainer: Any, beta: float, batches: int = SANITY_BATCHES) -> dict[str, Any]:
    """Score a few batches before training and stop on pairs that cannot teach anything (see sanity_verdict)."""
    import torch

    dataset = trainer.train_dataset
    size = trainer.args.per_device_train_batch_size
    count = min(len(dataset), batches * size)
    examples = [{k: dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(count)]
    identical = [e["chosen_ids"] == e["rejected_ids"] for e in examples]
    logps: dict[str, list[float]] = {"pc": [], "pr": [], "rc": [], "rr": []}
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        for start in range(0, count, size):
            batch = trainer.data_collator(examples[start:start + size])
            batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
            with torch.no_grad():
                chosen, rejected = completion_logps(model, batch)
                ref_chosen, ref_rejected = reference_logps(trainer, batch)
            for key, values in (("pc", chosen), ("pr", rejected), ("rc", ref_chosen), ("rr", ref_rejected)):
                logps[key].extend(values.float().tolist())
    finally:
        model.train(was_training)
    return sanity_verdict(identical, logps["pc"], logps["pr"], logps["rc"], logps["rr"], beta)


def completion_logps(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Summed log-probabilities of the chosen and rejected completions (batch = chosen rows, then rejected)."""
    mask = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(mask == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                use_cache=False, fused_lm_head=True)
    per_token = out.log_probs[:, -(mask.size(1) - 1):]
    return per_token.sum(dim=1).chunk(2, dim=0)


def reference_logps(trainer: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Reference log-probabilities: the explicit ref model, or the policy with its DPO adapter disabled."""
    if trainer.ref_model is not None:
        return completion_logps(trainer.ref_model, batch)
    with trainer.model.disable_adapter():
        return completion_logps(trainer.model, batch)


def sanity_verdict(identical: Sequence[bool], policy_chosen: Sequence[float], policy_rejected: Sequence[float],
                   ref_chosen: Sequence[float], ref_rejected: Sequence[float], beta: float) -> dict[str, Any]:
    """Raise PersllmError when DPO cannot learn from these pairs; else return the step-0 loss and accuracy.

    - every chosen answer equals its rejected one: margins are exactly 0 and the gradient is zero, forever;
    - loss already ~0 with reward accuracy 1 before any step: the policy is not the reference (continued SFT adapter
      trained on these answers, or a wrong reference model), so DPO has nothing left to optimise.
    """
    n = len(policy_chosen)
    if n == 0:
        raise PersllmError("DPO step-0 check got no pairs to score; check the pairs and dpo.max_length")
    margins = [beta * ((pc - rc) - (pr - rr))
               for pc, pr, rc, rr in zip(policy_chosen, policy_rejected, ref_chosen, ref_rejected, strict=True)]
    same_text = all(a == b for a, b in zip(policy_chosen, policy_rejected, strict=True))
    if (identical and all(identical)) or same_text:
        raise PersllmError(
            f"DPO step-0 check: in all {n} pairs checked the chosen answer is identical to the rejected one, so the "
            "reward margins are exactly 0 and DPO gets no gradient. The preference pairs are broken: rebuild them "
            "(build_pairs drops near-identical pairs at dpo.max_similarity) and make sure the negatives from data "
            "construction differ from the golden answers.")
    losses = [_softplus(-m) for m in margins]
    loss = sum(losses) / n
    accuracy = sum(m > 0 for m in margins) / n
    if loss < SANITY_MIN_LOSS and accuracy == 1.0:
        raise PersllmError(
            f"DPO step-0 check: the DPO loss is already {loss:.4f} with reward accuracy 1.0 before any training "
            f"({n} pairs), so the policy already prefers every chosen answer far more than the reference does. "
            "Likely cause: the model being trained is not the reference, e.g. the SFT adapter is being continued "
            "on pairs whose chosen answers it was trained on, or the reference is the base model instead of the SFT "
            "model. Train DPO as a fresh adapter on the merged SFT model (train_dpo does this; do not pass an SFT "
            "adapter as the DPO model), then re-run.")
    if any(abs(pc - rc) > 1e-3 for pc, rc in zip(policy_chosen, ref_chosen, strict=True)):
        log.warning("DPO step 0: the policy differs from the reference before training (loss %.4f); "
                    "expected identical models", loss)
    return {"pairs_checked": n, "identical_pairs": sum(bool(x) for x in identical), "loss": round(loss, 6),
            "accuracy": accuracy, "mean_margin": round(sum(margins) / n, 6),
            # reference log-likelihoods of the first chosen answers, to check the reference is the SFT model
            "ref_chosen_logps": [round(float(x), 4) for x in list(ref_chosen)[:SANITY_REPORT]]}


def _softplus(x: float) -> float:
    """log(1 + e^x) without overflow: the DPO sigmoid loss of a margin is softplus(-margin)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))
