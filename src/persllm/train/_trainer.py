"""What the SFT and DPO recipes share, and every hook persllm puts into TRL, PEFT and transformers (private).

Shared: the TrainingArguments both trainers use, token counts against max_length, checkpoint fingerprints and
resuming, the progress callback, saving the result (gathered from every rank) with its metrics, curves and the
post-training smoke test, and the run's stats.

Hooks, each marked `# Hook:` where it is defined with the reason it exists:
- length_grouped: a Trainer subclass overriding `_get_train_sampler` (batches of similar length pad little);
- lean_save: a Trainer subclass overriding `_save` (checkpoints without the resized embedding matrix);
- _token_rows_lr: wraps `trainer.create_optimizer` (the trainable token rows' own learning rate);
- checkpointing_arg: transformers' renamed gradient-checkpointing argument;
- patch_tied_head: `bias` on PEFT's TrainableTokensWrapper of a tied LM head (TRL's fused head reads it);
- cheap_trainable_tokens: PEFT's TrainableTokensLayer without a full embedding copy per read;
- enable_fast_cpu_loss: `trl.trainer.utils._use_triton` (TRL's fused head scores only label positions);
- enable_fast_cpu_head: `trl.trainer.utils._ChunkedLogProbFunction` (persllm's CPU kernel, cpu_head.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from persllm import dist, template
from persllm.config import Project
from persllm.decoding import Repetition
from persllm.progress import Progress, Task
from persllm.train import _model
from persllm.train.cpu_head import HEAD_OUTPUTS, ROWS_ATTR, LazyFunction, cpu_head, head_rows, plain
from persllm.types import Message
from persllm.workspace import atomic_dir, atomic_path, write_json, write_jsonl

log = logging.getLogger(__name__)

RUN_FILE = "persllm_run.json"  # fingerprint of the run the checkpoints belong to
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_METRIC_KEYS = ("loss", "learning_rate", "grad_norm", "epoch", "mean_token_accuracy", "entropy",
                "num_input_tokens_seen")
SMOKE_PROMPTS = 3
OTHER_RANK_SMOKE = {"ok": True, "skipped": "runs on rank 0 only", "outputs": []}
# Generating on rank 0 alone would hang on weights sharded across processes; `persllm eval` checks the result.
SHARDED_SMOKE = {"ok": True, "skipped": "weights sharded by ZeRO-3/FSDP; run `persllm eval`", "outputs": []}
# Marks the hooks leave on what they replaced, so each is applied once per process (or per layer).
_PATCH_MARK = "_persllm_compact_loss"
_ROWS_MARK = "_persllm_cheap_rows"
_HEAD_MARK = "_persllm_cpu_head"


# -- trainer arguments and lengths ----------------------------------------------------------------------------
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
        "bf16": use_bf16(), "fp16": False, "use_cpu": not cuda, checkpointing_arg(): False,
        "save_strategy": "steps", "save_steps": max(1, save_steps), "save_total_limit": 2,
        "logging_strategy": "steps", "logging_steps": 1, "report_to": "none", "disable_tqdm": True,
        "dataloader_num_workers": 0, "include_num_input_tokens_seen": "non_padding",
        # Multi-process runs: every LoRA/trainable-token parameter takes part in each step, so DDP can skip the
        # unused-parameter search it would otherwise do (and warn about) on every backward pass.
        "ddp_find_unused_parameters": False,
    }


# Hook: the name of a transformers argument, which changed between releases; both trainers switch checkpointing off.
def checkpointing_arg() -> str:
    """transformers 5.23 renamed gradient_checkpointing to activation_checkpointing (the old name warns)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def end_of_turn(tokenizer: Any) -> str:
    """The chat template's end-of-turn marker, which ends every trained assistant turn."""
    return template.markers_for(tokenizer.get_vocab())[1]


def conversation_tokens(tokenizer: Any, messages: Sequence[dict[str, str]]) -> int:
    """Tokens of a conversation rendered with the tokenizer's chat template (what max_length is compared with)."""
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=False)
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


# -- checkpoints ------------------------------------------------------------------------------------------------
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
            self.task: Task | None = None
            self.seen = 0
            self.first_step: int | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.task = task = progress.task(description, total=state.max_steps)
            self.first_step = self.seen = state.global_step
            if self.seen:
                task.advance(self.seen)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.task is not None and state.global_step > self.seen:
                self.task.advance(state.global_step - self.seen)
                self.seen = state.global_step

        def close(self) -> None:
            if self.task is not None:
                self.task.close()
                self.task = None

    return _Progress()


# -- hooks: trainer subclasses and the optimizer -----------------------------------------------------------------
GROUP_BATCHES = 50  # a mega-batch of this many batches is sorted by length before it is cut into batches


# Hook: overrides transformers' private Trainer._get_train_sampler, so batches of similar length pad little.
def length_grouped(trainer_cls: type) -> type:
    """Trainer subclass whose batches hold conversations (or pairs) of similar length, so they pad little.

    Every record is still seen once per epoch; only the order changes (see LengthGroupedBatches). With one record
    per batch there is nothing to pad and the trainer's own sampler is kept.
    """

    class Grouped(trainer_cls):
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


# Hook: overrides transformers' private Trainer._save, so checkpoints skip the resized embedding PEFT would add.
def lean_save(trainer_cls: type) -> type:
    """Trainer subclass whose checkpoints hold only the adapter, never the full (resized) embedding matrix.

    PEFT's default saves the whole embedding when the vocabulary grew (time tokens): 670 MB per checkpoint for
    Gemma's 262k vocabulary. The new rows are already in the adapter as trainable tokens.
    """

    class Lean(trainer_cls):
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


# Applies the per-trainer hooks (patch_tied_head, cheap_trainable_tokens, _token_rows_lr) to a built trainer.
def finish_setup(trainer: Any, token_lr_ratio: float = 1.0) -> None:
    """Trainer tweaks after construction: no printed logs, TRL's fused head working with trainable tokens, and the
    token rows' own learning rate."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # library code never prints; logs go to metrics.jsonl
    patch_tied_head(trainer.model)
    cheap_trainable_tokens(trainer.model)
    if token_lr_ratio != 1.0:
        _token_rows_lr(trainer, token_lr_ratio)


# Hook: wraps trainer.create_optimizer; transformers has no setting for a parameter group's own learning rate.
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


# -- hooks: PEFT trainable tokens -------------------------------------------------------------------------------
# Hook: sets `bias` on PEFT's TrainableTokensWrapper, which TRL's fused LM head reads and the wrapper lacks.
def patch_tied_head(model: Any) -> None:
    """Let TRL's fused LM head read `lm_head.bias` when PEFT wrapped a tied head for trainable tokens.

    With tied embeddings PEFT also wraps `lm_head` in a TrainableTokensWrapper that exposes the merged `weight`
    (so the new rows are used and trained at the output too) but not `bias`, which TRL reads. A bias-free head's
    bias is None, so mirroring that is exact.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None or type(head).__name__ != "TrainableTokensWrapper":
        return
    original = getattr(head, "original_module", None)
    if original is not None and getattr(original, "bias", None) is None and "bias" not in head.__dict__:
        head.bias = None


# Hook: replaces two methods of PEFT's TrainableTokensLayer, which copy the whole embedding matrix on every read.
def cheap_trainable_tokens(model: Any) -> int:
    """Make PEFT's trainable token rows cost k rows per step instead of copies of the whole embedding matrix.

    PEFT's TrainableTokensLayer rebuilds the full (for Gemma 262k x 640, 671 MB) embedding with `index_copy` on every
    read of its merged weight: the embedding forward and each read of the tied LM head's `weight` (TRL's fused head
    reads it three times per forward); the embedding backward then materialises a dense gradient of that size.
    Measured on Gemma 3 270M (CPU, Ada demo batches), training the two turn-marker rows made an SFT forward+backward
    33% slower with PEFT's code and 6% slower patched (the rest is TRL's dense LM-head gradient). Patched, the embedding
    looks up the frozen rows and swaps the trained ones in at their positions, and the LM head's weight is one
    working copy, made once, whose trained rows are refreshed in place; values and gradients are the same as PEFT's.
    Layers with several active adapters, or with sharded weights, keep PEFT's own code. Returns the layers patched.
    """
    import types

    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return 0
    buffers: dict[int, list[Any]] = {}  # id(base weight) -> [working copy]; tied layers share one
    patched = 0
    for module in model.modules():
        if not isinstance(module, TrainableTokensLayer) or getattr(module, _ROWS_MARK, False):
            continue
        setattr(module, "get_merged_weights",  # noqa: B010  (instance attributes shadow PEFT's methods)
                types.MethodType(_merged_weights(module.get_merged_weights, buffers), module))
        setattr(module, "forward_adapters", types.MethodType(_forward_adapters(module.forward_adapters), module))  # noqa: B010
        setattr(module, _ROWS_MARK, True)
        patched += 1
    return patched


def _merged_weights(original: Any, buffers: dict[int, list[Any]]) -> Any:
    def get_merged_weights(self: Any, active_adapters: Sequence[str]) -> Any:
        import torch

        weight = self.base_layer.weight
        if len(active_adapters) != 1 or not plain(weight):
            return original(active_adapters)
        name = active_adapters[0]
        holder = buffers.setdefault(id(weight), [None])
        work = holder[0]
        if (work is None or work.shape != weight.shape or work.dtype != weight.dtype
                or work.device != weight.device):
            holder[0] = work = weight.detach().clone()
        index = torch.as_tensor(self.token_indices[name], device=weight.device)
        delta = self.trainable_tokens_delta[name]
        merged = _RowsInto.apply(delta, holder, index)
        setattr(merged, ROWS_ATTR, (delta, index))  # cpu_head sends the gradient to these rows alone
        return merged

    return get_merged_weights


def _forward_adapters(original: Any) -> Any:
    def forward_adapters(self: Any, x: Any, active_adapters: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        import torch

        base = self.base_layer
        if (self.disable_adapters or self.merged or len(active_adapters) != 1 or args or kwargs
                or not isinstance(base, torch.nn.Embedding) or base.max_norm is not None or not plain(base.weight)):
            return original(x, active_adapters, *args, **kwargs)
        name = active_adapters[0]
        delta = self.trainable_tokens_delta[name]
        index = torch.as_tensor(self.token_indices[name], device=x.device)
        order = torch.argsort(index)
        ordered = index[order]
        slot = torch.searchsorted(ordered, x).clamp(max=len(ordered) - 1)
        hit = ordered[slot] == x
        result = base(x)  # frozen rows, with the model's own embedding scale (Gemma multiplies by sqrt(d))
        rows = delta[order[slot[hit]]].to(result.dtype)
        scale = self._get_embed_scale()
        if scale is not None:
            rows = rows * scale.to(result.dtype)
        return result.index_put((hit,), rows)

    return forward_adapters


def _rows_into_class() -> Any:
    import torch

    class RowsInto(torch.autograd.Function):
        """The working copy of a weight with the trained rows written in; the gradient goes to those rows only."""

        @staticmethod
        def forward(ctx: Any, delta: Any, holder: list[Any], index: Any) -> Any:
            work = holder[0]
            work.index_copy_(0, index, delta.detach().to(work.dtype))
            ctx.save_for_backward(index)
            ctx.delta_dtype = delta.dtype
            return work.detach()

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None, None]:
            (index,) = ctx.saved_tensors
            return grad.index_select(0, index).to(ctx.delta_dtype), None, None

    return RowsInto


_RowsInto = LazyFunction(_rows_into_class)


# -- hooks: the TRL CPU speed patch and LM-head kernel (the kernel itself is cpu_head.py) ------------------------
# Hook: replaces trl.trainer.utils._use_triton, so TRL's fused LM head scores only label positions on CPU too.
def enable_fast_cpu_loss() -> bool:
    """Make TRL's fused LM head score only label positions on every device (about 2x faster CPU training).

    TRL 1.16 decides with `trl.trainer.utils._use_triton(device)` whether to gather the positions whose label is not
    -100 before the chunked log-prob kernel; off Triton devices it scores every position, most of them prompt tokens
    that are thrown away. Returning True only changes that gather (the kernel itself keeps its CPU torch path), and
    losses are bit-identical. The symbol is private, so the patch is applied only when it is still used the way we
    expect; otherwise training goes on unpatched (correct, just slower) with a warning.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:  # pragma: no cover - trl is a hard dependency
        return False
    current = getattr(trl_utils, "_use_triton", None)
    if getattr(current, _PATCH_MARK, False):
        return True
    if not callable(current) or not _fused_head_uses_use_triton(trl_utils):
        log.warning("TRL %s no longer routes its fused LM head through trl.trainer.utils._use_triton; "
                    "training runs without persllm's CPU speed patch (about 2x slower on CPU)", _trl_version())
        return False

    def _use_triton(device: Any) -> bool:
        return True

    setattr(_use_triton, _PATCH_MARK, True)
    trl_utils._use_triton = _use_triton
    enable_fast_cpu_head()
    return True


def fast_cpu_loss_active() -> bool:
    """True when TRL's fused LM head currently scores only label positions."""
    import trl.trainer.utils as trl_utils

    return bool(getattr(getattr(trl_utils, "_use_triton", None), _PATCH_MARK, False))


# Hook: replaces trl.trainer.utils._ChunkedLogProbFunction with _head_dispatcher (TRL's CPU fallback is slow).
def enable_fast_cpu_head() -> bool:
    """Off Triton devices, run TRL's fused LM head through persllm's one-pass CPU kernel (about 3-4x faster).

    TRL's torch fallback of its chunked log-prob kernel projects every vocabulary tile of the 262k head three or four
    times per step (forward, recompute, hidden gradient and, when trained token rows make the tied head's weight
    require grad, a dense 262k x 640 weight gradient of which two rows are kept), with a dozen elementwise passes
    over each tile. persllm's kernel (cpu_head) projects each tile once and folds the softmax-weighted head rows into
    the hidden-state gradient in the same pass, so the backward is one multiply; trained token rows get their own
    few-row gradient. Calls it does not cover (Triton devices, soft-capped logits, autocast, other dtypes, a weight
    or bias that needs a dense gradient, extra outputs) go to TRL's kernel unchanged.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:  # pragma: no cover - trl is a hard dependency
        return False
    current = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if getattr(current, _HEAD_MARK, False):
        return True
    kernel_uses_triton: Callable[..., bool] | None
    try:  # the unpatched device check: Triton devices keep TRL's own kernel
        from trl.kernels.chunked_logprob import _use_triton as kernel_uses_triton
    except ImportError:
        kernel_uses_triton = None
    if (not callable(getattr(current, "apply", None)) or not callable(kernel_uses_triton)
            or not _fused_head_uses(trl_utils, "_ChunkedLogProbFunction")):
        log.warning("TRL %s no longer routes its fused LM head through trl.trainer.utils._ChunkedLogProbFunction; "
                    "training runs without persllm's CPU LM-head kernel (slower on CPU)", _trl_version())
        return False
    setattr(trl_utils, "_ChunkedLogProbFunction", _head_dispatcher(current, kernel_uses_triton))  # noqa: B010
    return True


def fast_cpu_head_active() -> bool:
    """True when TRL's fused LM head currently goes through persllm's CPU kernel where it applies."""
    import trl.trainer.utils as trl_utils

    return bool(getattr(getattr(trl_utils, "_ChunkedLogProbFunction", None), _HEAD_MARK, False))


def _fused_head_uses_use_triton(module: Any) -> bool:
    """Whether `add_fused_lm_head` (or a function nested in it) looks up the global `_use_triton`."""
    return _fused_head_uses(module, "_use_triton")


def _fused_head_uses(module: Any, name: str) -> bool:
    """Whether `add_fused_lm_head` (or a function nested in it) looks up the global `name`."""
    head = getattr(module, "add_fused_lm_head", None)
    code = getattr(head, "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        current = stack.pop()
        if name in current.co_names:
            return True
        stack.extend(c for c in current.co_consts if hasattr(c, "co_names"))
    return False


def _trl_version() -> str:
    import trl

    return getattr(trl, "__version__", "?")


def _head_dispatcher(original: Any, kernel_uses_triton: Any) -> Any:
    """A stand-in for TRL's `_ChunkedLogProbFunction` (same `apply` signature) that runs cpu_head where it can."""

    class CpuLogProbHead:
        wrapped = original

        @staticmethod
        def apply(hidden: Any, weight: Any, bias: Any, targets: Any, temperature: float, chunk_size: int,
                  final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
                  outputs: Sequence[str] = tuple(HEAD_OUTPUTS)) -> Any:
            rows = head_rows(hidden, weight, bias, temperature, final_logit_softcapping, logit_scale, outputs,
                             kernel_uses_triton)
            if rows is False:
                return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
            delta, index = rows if rows is not None else (None, None)
            return cpu_head(hidden, weight.detach(), delta, index, bias, targets, logit_scale / temperature,
                            chunk_size, tuple(outputs))

    setattr(CpuLogProbHead, _HEAD_MARK, True)
    return CpuLogProbHead


# -- post-training generation check ----------------------------------------------------------------------------
SMOKE_NEW_TOKENS = 96  # the least budget; smoke_budget raises it to fit the data
SMOKE_MARGIN = 1.5
_REPEAT_N = 6  # a token 6-gram seen this often in one short answer means the model loops
_REPEAT_TIMES = 3


def smoke_budget(tokenizer: Any, answers: Sequence[str]) -> int:
    """New tokens the smoke test allows: the longest reference answer (plus end-of-turn) times SMOKE_MARGIN, at
    least SMOKE_NEW_TOKENS, so a model that answers as long as its training data is never flagged no_stop merely
    because the budget ran out (the Ada demo's answers run to 138 tokens)."""
    longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers), default=0)
    return max(SMOKE_NEW_TOKENS, math.ceil(longest * SMOKE_MARGIN))


def smoke_test(model: Any, tokenizer: Any, prompts: Sequence[Sequence[Any]], keep_cot: bool,
               max_new_tokens: int = SMOKE_NEW_TOKENS, repetition: Repetition | None = None) -> dict[str, Any]:
    """Greedy answers to a few training prompts: do they stop at end-of-turn, loop, carry the [Response] tag?

    Template mismatches show up here as answers that never stop or repeat forever; the result is reported, never
    raised, because tiny or briefly trained models fail it legitimately. Answers are decoded with `repetition`, as
    eval, chat and serve decode them.
    """
    import torch
    from transformers import LogitsProcessorList

    from persllm.decoding import hf_processor
    from persllm.models import stop_token_ids

    stops = stop_token_ids(tokenizer)
    repetition = repetition or Repetition()
    outputs = []
    was_training = model.training
    model.eval()
    # Unmerged trainable tokens rebuild the whole embedding matrix on every forward (0.85 s per generated token
    # on Gemma's 262k vocabulary); merged, generation runs at full speed. The adapter is already saved.
    merge = hasattr(model, "merge_adapter") and not getattr(model, "is_loaded_in_4bit", False)
    if merge:
        model.merge_adapter()
    try:
        for messages in prompts:
            chat = [{"role": m.role, "content": m.content} for m in messages]
            rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer(rendered, return_tensors="pt", add_special_tokens=False).to(model.device)
            width = inputs["input_ids"].shape[1]
            processors = LogitsProcessorList([hf_processor(repetition, width)] if repetition.active else [])
            with torch.no_grad():
                generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                           eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                                           logits_processor=processors)
            ids = generated[0, inputs["input_ids"].shape[1]:].tolist()
            outputs.append(_judge(ids, stops, tokenizer, keep_cot, messages[-1].content))
    finally:
        if merge:
            model.unmerge_adapter()
        model.train(was_training)
    problems = sorted({p for o in outputs for p in o["problems"]})
    return {"ok": bool(outputs) and not problems, "problems": problems, "outputs": outputs,
            "max_new_tokens": max_new_tokens, "repetition": repetition.as_dict()}


def _judge(ids: list[int], stops: Sequence[int], tokenizer: Any, keep_cot: bool, question: str) -> dict[str, Any]:
    """Checks on one generated answer."""
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    body = ids if end is None else ids[:end]
    text = tokenizer.decode(body, skip_special_tokens=True)
    grams = Counter(tuple(body[i:i + _REPEAT_N]) for i in range(len(body) - _REPEAT_N + 1))
    repeats = max(grams.values(), default=0)
    problems = []
    if end is None:
        problems.append("no_stop")
    if repeats >= _REPEAT_TIMES:
        problems.append("repetition")
    has_tag = template.RESPONSE_TAG.lower() in text.lower()
    if keep_cot and not has_tag:
        problems.append("no_response_tag")
    return {"question": question, "text": text, "tokens": len(body), "stopped": end is not None,
            "max_repeat": repeats, "has_response_tag": has_tag, "problems": problems}


# -- after training -------------------------------------------------------------------------------------------
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
               max_new_tokens: int = SMOKE_NEW_TOKENS,
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
             else smoke_test(trainer.model, tokenizer, prompts, keep_cot, max_new_tokens=max_new_tokens,
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


def trainable_parameters(model: Any) -> int:
    """Number of parameters the optimizer updates."""
    # ZeRO-3 leaves each process an empty shard of every parameter; ds_numel is the full size
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def run_stats(trainer: Any, result: Any, metrics: Sequence[dict[str, Any]], smoke: dict[str, Any],
              started: float, checkpoint: str | None, fast: bool) -> dict[str, Any]:
    """Stats shared by SFT and DPO runs."""
    train_metrics = dict(getattr(result, "metrics", {}) or {})
    runtime = float(train_metrics.get("train_runtime") or 0.0)
    match = _CHECKPOINT.match(Path(checkpoint).name) if checkpoint else None
    resumed = int(match[1]) if match else 0  # prepare_checkpoints resumes only from checkpoint-N folders
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
