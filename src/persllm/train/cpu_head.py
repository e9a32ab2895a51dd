"""persllm's one-pass CPU kernel for TRL's fused LM head (log-probabilities of the label tokens and what TRL reports
beside them), with the small pieces it shares with the PEFT trainable-token hook in _trainer.py.

_trainer.enable_fast_cpu_head routes TRL's `_ChunkedLogProbFunction` here off Triton devices; `head_rows` says which
calls the kernel covers. torch is imported on first use only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

ROWS_ATTR = "_persllm_rows"  # on the tied head weight built by _trainer's _RowsInto: (trained rows' delta, indices)
HEAD_OUTPUTS = frozenset({"log_probs", "entropy", "mean_logits", "is_top1"})
_HEAD_TOKENS = 4096  # tokens per tile, as TRL's kernel


def head_rows(hidden: Any, weight: Any, bias: Any, temperature: float, softcap: float | None, logit_scale: float,
              outputs: Sequence[str], uses_triton: Any) -> Any:
    """False when cpu_head does not cover the call; else None or the (delta, index) of trained tied-head rows."""
    import torch

    if (uses_triton(hidden.device) or softcap is not None or not set(outputs) <= HEAD_OUTPUTS
            or hidden.dim() != 2 or hidden.dtype != torch.float32 or weight.dtype != torch.float32
            or not plain(weight) or torch.is_autocast_enabled(hidden.device.type)
            or not logit_scale / temperature > 0 or (bias is not None and bias.requires_grad)):
        return False
    if not (weight.requires_grad and torch.is_grad_enabled()):
        return None
    rows = getattr(weight, ROWS_ATTR, None)  # a weight whose only trained rows are _RowsInto's
    return rows if rows is not None else False


def plain(weight: Any) -> bool:
    """A whole, ordinary tensor (not a DTensor shard, a ZeRO-3 placeholder or a quantized parameter)."""
    import torch

    return type(weight.data) is torch.Tensor and weight.dim() == 2 and not hasattr(weight, "ds_id")


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


class LazyFunction:
    """An autograd Function built on first use, so torch is imported only when training needs it."""

    def __init__(self, build: Any) -> None:
        self._build = build
        self._cls: Any = None  # a torch.autograd.Function subclass once built (torch is not imported here)

    def apply(self, *args: Any) -> Any:
        if self._cls is None:
            self._cls = self._build()
        return self._cls.apply(*args)


_CpuHead = LazyFunction(_cpu_head_class)
