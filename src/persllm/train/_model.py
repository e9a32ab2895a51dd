"""Loading the model to tune: tokenizer with persllm's template and time tokens, LoRA config, CPU speed patch."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm import template
from persllm.config import Project, SFTConfig
from persllm.decoding import Repetition
from persllm.errors import ConfigError

log = logging.getLogger(__name__)

_PATCH_MARK = "_persllm_compact_loss"
_ROWS_MARK = "_persllm_cheap_rows"
_HEAD_MARK = "_persllm_cpu_head"
_ROWS_ATTR = "_persllm_rows"  # on the tied head weight built by _RowsInto: (trained rows' delta, their indices)


# -- the TRL CPU speed patch ------------------------------------------------------------------------------------
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


# -- persllm's CPU LM-head kernel ------------------------------------------------------------------------------
_HEAD_OUTPUTS = frozenset({"log_probs", "entropy", "mean_logits", "is_top1"})
_HEAD_TOKENS = 4096  # tokens per tile, as TRL's kernel


def _head_dispatcher(original: Any, kernel_uses_triton: Any) -> Any:
    """A stand-in for TRL's `_ChunkedLogProbFunction` (same `apply` signature) that runs cpu_head where it can."""

    class CpuLogProbHead:
        wrapped = original

        @staticmethod
        def apply(hidden: Any, weight: Any, bias: Any, targets: Any, temperature: float, chunk_size: int,
                  final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
                  outputs: Sequence[str] = tuple(_HEAD_OUTPUTS)) -> Any:
            rows = _head_rows(hidden, weight, bias, temperature, final_logit_softcapping, logit_scale, outputs,
                              kernel_uses_triton)
            if rows is False:
                return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
            delta, index = rows if rows is not None else (None, None)
            return cpu_head(hidden, weight.detach(), delta, index, bias, targets, logit_scale / temperature,
                            chunk_size, tuple(outputs))

    setattr(CpuLogProbHead, _HEAD_MARK, True)
    return CpuLogProbHead


def _head_rows(hidden: Any, weight: Any, bias: Any, temperature: float, softcap: float | None, logit_scale: float,
               outputs: Sequence[str], uses_triton: Any) -> Any:
    """False when cpu_head does not cover the call; else None or the (delta, index) of trained tied-head rows."""
    import torch

    if (uses_triton(hidden.device) or softcap is not None or not set(outputs) <= _HEAD_OUTPUTS
            or hidden.dim() != 2 or hidden.dtype != torch.float32 or weight.dtype != torch.float32
            or not _plain(weight) or torch.is_autocast_enabled(hidden.device.type)
            or not logit_scale / temperature > 0 or (bias is not None and bias.requires_grad)):
        return False
    if not (weight.requires_grad and torch.is_grad_enabled()):
        return None
    rows = getattr(weight, _ROWS_ATTR, None)  # a weight whose only trained rows are _RowsInto's
    return rows if rows is not None else False


def cpu_head(hidden: Any, weight: Any, delta: Any, index: Any, bias: Any, targets: Any, scale: float,
             chunk_size: int, outputs: tuple[str, ...]) -> Any:
    """Per-token log-probabilities of `targets` under softmax(scale * (hidden @ weight.T + bias)), in one pass.

    Returns TRL's five per-token outputs (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1; None where not
    requested; log_sum_sq_probs is never computed). `delta`/`index`: rows of `weight` that are trained (the
    values are already in `weight`); their gradient goes to `delta`. Every other row of `weight` and `bias` is
    treated as frozen.
    """
    return _CpuHead.apply(hidden, weight, delta, index, bias, targets, scale, chunk_size, outputs)


def _cpu_head_class() -> Any:
    import torch

    class CpuHead(torch.autograd.Function):
        """One pass over the vocabulary tiles: an online log-sum-exp, and for the backward the softmax-weighted sum
        of head rows, so that d log p(t|h) / dh = scale * (W[t] - E_p[W]) is ready when the forward ends.

        Each tile is projected once and the backward multiplies a saved [tokens, hidden] matrix by the incoming
        gradient; TRL's torch fallback re-projects every tile in the backward and (with a trained tied head) builds
        a dense vocabulary-sized weight gradient. Entropy comes from the same sum (sum_j p_j z_j = scale * h . E_p[W]),
        and trained rows keep their logits so their gradient, scale * sum_i g_i (1[t_i=r] - p_ir) h_i, is a few rows.
        """

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, delta: Any, index: Any, bias: Any, targets: Any,
                    scale: float, chunk_size: int, outputs: tuple[str, ...]) -> Any:
            ctx.set_materialize_grads(False)
            need_hidden = ctx.needs_input_grad[0]
            need_rows = delta is not None and ctx.needs_input_grad[2]
            want = {name: name in outputs for name in ("entropy", "mean_logits", "is_top1")}
            n, width = hidden.shape
            vocab = weight.shape[0]
            chunk_size = max(1, min(chunk_size, vocab))
            f32 = {"device": hidden.device, "dtype": torch.float32}
            log_z, target_y = torch.empty(n, **f32), torch.empty(n, **f32)
            y_e: Any = torch.empty(n, **f32) if want["entropy"] else None  # E_p[raw logit]
            y_sum: Any = torch.zeros(n, **f32) if want["mean_logits"] else None
            top: Any = torch.empty(n, dtype=torch.long, device=hidden.device) if want["is_top1"] else None
            jacobian: Any = torch.empty(n, width, **f32) if need_hidden else None
            rows_y: Any = torch.empty(n, len(index), **f32) if need_rows else None
            if need_rows:
                order = torch.argsort(index)
                sorted_rows = index[order]
            tile_buf = torch.empty(min(n, _HEAD_TOKENS), chunk_size, **f32)
            # without the hidden gradient there is no E_p[W]; the entropy then takes one more pass per tile
            exp_buf = torch.empty_like(tile_buf) if want["entropy"] and not need_hidden else None
            for t0 in range(0, n, _HEAD_TOKENS):
                t1 = min(t0 + _HEAD_TOKENS, n)
                k, h, tgt = t1 - t0, hidden[t0:t1], targets[t0:t1]
                run_max = torch.full((k,), -math.inf, **f32)
                sum_exp, tgt_y = torch.zeros(k, **f32), torch.zeros(k, **f32)
                e_y: Any = torch.zeros(k, **f32) if exp_buf is not None else None
                e_w: Any = torch.zeros(k, width, **f32) if need_hidden else None
                e_b: Any = torch.zeros(k, **f32) if need_hidden and want["entropy"] and bias is not None else None
                arg: Any = torch.zeros(k, dtype=torch.long, device=hidden.device) if want["is_top1"] else None
                for v0 in range(0, vocab, chunk_size):
                    v1 = min(v0 + chunk_size, vocab)
                    c, w = v1 - v0, weight[v0:v1]
                    tile = tile_buf[:k, :c]
                    torch.mm(h, w.t(), out=tile)
                    if bias is not None:
                        tile.add_(bias[v0:v1])
                    local = tgt - v0
                    inside = (local >= 0) & (local < c)
                    tgt_y = torch.where(inside, tile.gather(1, local.clamp(0, c - 1).unsqueeze(1)).squeeze(1), tgt_y)
                    if need_rows:
                        lo, hi = int(torch.searchsorted(sorted_rows, v0)), int(torch.searchsorted(sorted_rows, v1))
                        if hi > lo:
                            rows_y[t0:t1, order[lo:hi]] = tile[:, sorted_rows[lo:hi] - v0]
                    if y_sum is not None:
                        y_sum[t0:t1] += tile.sum(1)
                    tile_max, tile_arg = tile.max(1)
                    if arg is not None:  # the first maximum, as TRL's is_top1
                        arg = torch.where(tile_max > run_max, tile_arg + v0, arg)
                    new_max = torch.maximum(run_max, tile_max)
                    rescale = torch.exp((run_max - new_max) * scale)
                    if exp_buf is not None:
                        e = exp_buf[:k, :c]
                        torch.sub(tile, new_max.unsqueeze(1), out=e)
                        if scale != 1.0:
                            e.mul_(scale)
                        e.exp_()
                        e_y.mul_(rescale).add_(torch.linalg.vecdot(e, tile))
                    else:
                        tile.sub_(new_max.unsqueeze(1))
                        if scale != 1.0:
                            tile.mul_(scale)
                        e = tile.exp_()
                    sum_exp.mul_(rescale).add_(e.sum(1))
                    if e_w is not None:
                        e_w.mul_(rescale.unsqueeze(1)).addmm_(e, w)
                        if e_b is not None:
                            e_b.mul_(rescale).add_(e @ bias[v0:v1])
                    run_max = new_max
                log_z[t0:t1] = run_max * scale + torch.log(sum_exp)
                target_y[t0:t1] = tgt_y
                if y_e is not None:
                    if e_y is None:
                        e_y = torch.linalg.vecdot(h, e_w) + (e_b if e_b is not None else 0.0)
                    y_e[t0:t1] = e_y / sum_exp
                if top is not None:
                    top[t0:t1] = arg
                if jacobian is not None:
                    jacobian[t0:t1] = (weight[tgt] - e_w / sum_exp.unsqueeze(1)) * scale
            log_probs = target_y * scale - log_z
            entropy = log_z - y_e * scale if y_e is not None else None
            mean_logits = y_sum * (scale / vocab) if y_sum is not None else None
            is_top1 = top == targets if top is not None else None
            ctx.scale, ctx.need_rows = scale, need_rows
            ctx.delta_dtype = delta.dtype if delta is not None else None
            if need_rows:
                hit = (targets.unsqueeze(1) == index.unsqueeze(0)).float()
                ctx.save_for_backward(jacobian, hidden, hit - torch.exp(rows_y * scale - log_z.unsqueeze(1)))
            else:
                ctx.save_for_backward(jacobian)
            # an entropy gradient (an entropy bonus in the loss) needs the recomputed tiles: TRL's kernel does that
            ctx.fallback = (hidden, weight, delta, index, bias, targets, scale, chunk_size, outputs)
            ctx.mark_non_differentiable(*(x for x in (mean_logits, is_top1) if x is not None))
            return log_probs, entropy, None, mean_logits, is_top1

        @staticmethod
        def backward(ctx: Any, grad_log_probs: Any, grad_entropy: Any, *_: Any) -> tuple[Any, ...]:
            if grad_entropy is not None:
                return _head_backward_via_trl(ctx, grad_log_probs, grad_entropy)
            none = (None,) * 9
            if grad_log_probs is None:
                return none
            saved = ctx.saved_tensors
            grad_hidden = grad_log_probs.unsqueeze(1) * saved[0] if saved[0] is not None else None
            grad_delta = None
            if ctx.need_rows:
                hidden, coef = saved[1], saved[2]
                grad_delta = ((coef * (grad_log_probs * ctx.scale).unsqueeze(1)).t() @ hidden).to(ctx.delta_dtype)
            return grad_hidden, None, grad_delta, *none[3:]

    return CpuHead


def _head_backward_via_trl(ctx: Any, grad_log_probs: Any, grad_entropy: Any) -> tuple[Any, ...]:
    """The gradient through TRL's own kernel (recomputing the tiles), for an entropy that is part of the loss."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight, delta, index, bias, targets, scale, chunk_size, outputs = ctx.fallback
    with torch.enable_grad():
        h = hidden.detach().requires_grad_(ctx.needs_input_grad[0])
        w = weight.detach().requires_grad_(ctx.need_rows)
        log_probs, entropy, *_ = ChunkedLogProbFunction.apply(h, w, bias, targets, 1.0, chunk_size, None, scale,
                                                              outputs)
        pairs = [(o, g) for o, g in ((log_probs, grad_log_probs), (entropy, grad_entropy)) if g is not None]
        wrt = [x for x in (h, w) if x.requires_grad]
        grads = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs]))
    grad_hidden = grads.pop(0) if h.requires_grad else None
    grad_delta = grads.pop(0).index_select(0, index).to(delta.dtype) if w.requires_grad else None
    return grad_hidden, None, grad_delta, None, None, None, None, None, None


class _LazyFunction:
    """An autograd Function built on first use, so torch is imported only when training needs it."""

    def __init__(self, build: Any) -> None:
        self._build, self._cls = build, None

    def apply(self, *args: Any) -> Any:
        if self._cls is None:
            self._cls = self._build()
        return self._cls.apply(*args)


_CpuHead = _LazyFunction(_cpu_head_class)


# -- devices, quiet libraries -----------------------------------------------------------------------------------
def use_cuda() -> bool:
    """Train on CUDA when a GPU is visible."""
    import torch

    return torch.cuda.is_available()


def check_method(method: str) -> None:
    """Fail early when a fine-tuning method cannot run here."""
    if method not in ("lora", "qlora", "full"):
        raise ConfigError(f"sft.method: {method!r} is not one of lora, qlora, full")
    if method == "qlora":
        if not use_cuda():
            raise ConfigError("sft.method=qlora needs a CUDA GPU (4-bit bitsandbytes kernels); "
                              "use sft.method=lora on CPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("sft.method=qlora needs the bitsandbytes package: pip install bitsandbytes "
                              "(or use sft.method=lora)")


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Training/scoring environment: no progress bars (library code never prints), denormals flushed on CPU.

    Denormal floats make CPU matmuls and attention up to 10x slower (measured: a tiny SFT+DPO run went from 40 s to
    3 s); flushing them to zero changes nothing a model can notice. torch has no getter for the flag, so it is
    reset to its default (off) afterwards.
    """
    import datasets.utils.logging as ds_logging
    import torch
    import transformers.utils.logging as tf_logging

    saved = [(mod, mod.is_progress_bar_enabled()) for mod in (ds_logging, tf_logging)]
    for mod, _ in saved:
        mod.disable_progress_bar()
    flushed = torch.set_flush_denormal(True)
    try:
        with warnings.catch_warnings():
            # PEFT/TRL still call transformers' renamed is_gradient_checkpointing; nothing a user can act on.
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated",
                                    category=FutureWarning)
            yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        for mod, enabled in saved:
            if enabled:
                mod.enable_progress_bar()


# -- tokenizer and model ---------------------------------------------------------------------------------------
def time_tokens(project: Project) -> list[str]:
    """The paper's stage tokens <TIME-I>, <TIME-II>, ... (one per stage) when the project uses them, else none."""
    if project.sft.temporal_labels != "tokens":
        return []
    return [template.time_token(i) for i in range(len(project.stages))]


def load_tokenizer(source: str | Path, project: Project) -> tuple[Any, list[int]]:
    """Tokenizer with persllm's chat template (if it has none) and the time tokens; also the ids it gained."""
    from transformers import AutoTokenizer

    from persllm.models import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    before = set(tokenizer.get_vocab())
    prepare_tokenizer(tokenizer)
    missing = [t for t in time_tokens(project) if t not in tokenizer.get_vocab()]
    if missing:
        # Special so they are never split; extended rather than replaced so the turn markers stay special.
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    vocab = tokenizer.get_vocab()
    added = sorted(vocab[t] for t in set(vocab) - before)
    return tokenizer, added


def load_model(path: str | Path, tokenizer: Any, quantize: bool = False) -> Any:
    """Causal LM in fp32 on CPU (bf16 is ~10x slower there), bf16 on CUDA, resized to the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = use_cuda()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": local_gpu()}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    set_stop_tokens(model, tokenizer)
    if cuda and not quantize:
        model.to(f"cuda:{local_gpu()}")
    return model


def local_gpu() -> int:
    """This process's GPU: LOCAL_RANK under `accelerate launch`/torchrun (never every rank on GPU 0), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def set_stop_tokens(model: Any, tokenizer: Any) -> None:
    """Generation stops at EOS or the template's end-of-turn marker (a missing stop token means endless output)."""
    from persllm.models import stop_token_ids

    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id


@dataclass
class Loaded:
    """The model to tune and how it was built."""

    model: Any
    tokenizer: Any
    base_path: str  # transformers-loadable base model
    below: list[Path]  # adapters already merged into `model` (persllm_adapter.json "stack" of what is trained now)
    new_token_ids: list[int]  # tokens the tokenizer gained here; their embeddings must be trained

    @property
    def token_rows(self) -> list[int]:
        """Embedding rows LoRA training updates as trainable tokens (see trained_token_ids)."""
        return trained_token_ids(self.tokenizer, self.new_token_ids)


def trained_token_ids(tokenizer: Any, added: Sequence[int] = ()) -> list[int]:
    """Token rows LoRA training updates besides the adapter: tokens the tokenizer gained, and the turn markers.

    A base model never saw the chat template's markers in pretraining. Gemma 3 270M's <end_of_turn> row (tied with
    the LM head) is untrained: cosine 0.995 with thousands of <unusedNNN> and glitch tokens, so a hidden state aimed
    at it lands on a neighbour ("stepToken") and the tuned model never stops. LoRA never touches embedding rows, so
    the marker rows are trained explicitly.
    """
    vocab = tokenizer.get_vocab()
    markers = [vocab[t] for t in template.markers_for(vocab) if t in vocab]
    return sorted(set(added) | set(markers))


def load_base(project: Project, quantize: bool = False) -> Loaded:
    """The project's base model (plus any adapter named in base_model.adapter, merged) ready for SFT."""
    from transformers import set_seed

    from persllm.backends import base_model_path
    from persllm.backends.hf import adapter_stack, merge_adapters

    set_seed(project.seed)  # resizing samples the new token rows at random

    base = base_model_path(project.base_model)
    top = base_adapter(project)
    below: list[Path] = adapter_stack(top) if top is not None else []
    if quantize and below:
        raise ConfigError("sft.method=qlora cannot start from base_model.adapter (a 4-bit model cannot be merged "
                          "into); merge the adapter into the base model first or use sft.method=lora")
    tokenizer, added = base_tokenizer(project)
    model = load_model(base, tokenizer, quantize=quantize)
    model = merge_adapters(model, below)
    return Loaded(model=model, tokenizer=tokenizer, base_path=base, below=below, new_token_ids=added)


def base_adapter(project: Project) -> Path | None:
    """The adapter named in base_model.adapter (checked to be one), or None."""
    if not project.base_model.adapter:
        return None
    top = Path(project.base_model.adapter).expanduser()
    if not top.is_absolute():
        top = (project.root / top).resolve()
    if not (top / "adapter_config.json").is_file():
        raise ConfigError(f"base_model.adapter: {top} has no adapter_config.json")
    return top


def base_tokenizer(project: Project) -> tuple[Any, list[int]]:
    """The tokenizer SFT trains with (the base's, or base_model.adapter's if it has one), prepared by
    load_tokenizer; also the ids it gained."""
    from persllm.backends import base_model_path

    top = base_adapter(project)
    source = top if top is not None and (top / "tokenizer_config.json").is_file() else base_model_path(
        project.base_model)
    return load_tokenizer(source, project)


# -- LoRA ------------------------------------------------------------------------------------------------------
def target_modules(value: str) -> str | list[str]:
    """'all-linear' (PEFT's shorthand, never the LM head) or a comma-separated list of module names."""
    value = value.strip()
    if value in ("", "all-linear"):
        return "all-linear"
    return [part.strip() for part in value.split(",") if part.strip()]


def lora_config(sft: SFTConfig, trainable_tokens: Sequence[int] = (), model: Any = None) -> Any:
    """LoRA on the configured modules; the given tokens (new ones, turn markers) train their own embedding rows.

    `trainable_token_indices` keeps a few rows trainable instead of `modules_to_save` on the embedding, which would
    copy and optimise the whole (for Gemma 262k x 640, tied with the LM head) matrix. A tied LM head follows the
    embedding; an untied one (pass `model`) gets the same rows trained, so new turn markers can be predicted.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=sft.lora_r, lora_alpha=sft.lora_alpha, lora_dropout=sft.lora_dropout,
        target_modules=target_modules(sft.target_modules), task_type="CAUSAL_LM", bias="none",
        trainable_token_indices=_token_targets(list(trainable_tokens), model),
    )


def _token_targets(ids: list[int], model: Any) -> list[int] | dict[str, list[int]] | None:
    """PEFT trainable_token_indices: the input embedding, plus an untied output embedding."""
    if not ids:
        return None
    if model is None or getattr(model.config.get_text_config(), "tie_word_embeddings", True):
        return ids
    names = {id(m): n for n, m in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or id(embed) not in names or id(head) not in names:
        return ids
    return {names[id(embed)]: ids, names[id(head)]: ids}


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


def _plain(weight: Any) -> bool:
    """A whole, ordinary tensor (not a DTensor shard, a ZeRO-3 placeholder or a quantized parameter)."""
    import torch

    return type(weight.data) is torch.Tensor and weight.dim() == 2 and not hasattr(weight, "ds_id")


def _merged_weights(original: Any, buffers: dict[int, list[Any]]) -> Any:
    def get_merged_weights(self: Any, active_adapters: Sequence[str]) -> Any:
        import torch

        weight = self.base_layer.weight
        if len(active_adapters) != 1 or not _plain(weight):
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
        setattr(merged, _ROWS_ATTR, (delta, index))  # cpu_head sends the gradient to these rows alone
        return merged

    return get_merged_weights


def _forward_adapters(original: Any) -> Any:
    def forward_adapters(self: Any, x: Any, active_adapters: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        import torch

        base = self.base_layer
        if (self.disable_adapters or self.merged or len(active_adapters) != 1 or args or kwargs
                or not isinstance(base, torch.nn.Embedding) or base.max_norm is not None or not _plain(base.weight)):
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


_RowsInto = _LazyFunction(_rows_into_class)


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
