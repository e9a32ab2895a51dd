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
from persllm.errors import ConfigError

log = logging.getLogger(__name__)

_PATCH_MARK = "_persllm_compact_loss"
_ROWS_MARK = "_persllm_cheap_rows"


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
    return True


def fast_cpu_loss_active() -> bool:
    """True when TRL's fused LM head currently scores only label positions."""
    import trl.trainer.utils as trl_utils

    return bool(getattr(getattr(trl_utils, "_use_triton", None), _PATCH_MARK, False))


def _fused_head_uses_use_triton(module: Any) -> bool:
    """Whether `add_fused_lm_head` (or a function nested in it) looks up the global `_use_triton`."""
    head = getattr(module, "add_fused_lm_head", None)
    code = getattr(head, "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        current = stack.pop()
        if "_use_triton" in current.co_names:
            return True
        stack.extend(c for c in current.co_consts if hasattr(c, "co_names"))
    return False


def _trl_version() -> str:
    import trl

    return getattr(trl, "__version__", "?")


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
    below: list[Path] = []
    tok_source: str | Path = base
    if project.base_model.adapter:
        top = Path(project.base_model.adapter).expanduser()
        if not top.is_absolute():
            top = (project.root / top).resolve()
        if not (top / "adapter_config.json").is_file():
            raise ConfigError(f"base_model.adapter: {top} has no adapter_config.json")
        below = adapter_stack(top)
        if (top / "tokenizer_config.json").is_file():
            tok_source = top
    if quantize and below:
        raise ConfigError("sft.method=qlora cannot start from base_model.adapter (a 4-bit model cannot be merged "
                          "into); merge the adapter into the base model first or use sft.method=lora")
    tokenizer, added = load_tokenizer(tok_source, project)
    model = load_model(base, tokenizer, quantize=quantize)
    model = merge_adapters(model, below)
    return Loaded(model=model, tokenizer=tokenizer, base_path=base, below=below, new_token_ids=added)


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
        return _RowsInto.apply(self.trainable_tokens_delta[name], holder, index)

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


class _LazyRowsInto:
    """torch is imported only when training needs it."""

    _cls: Any = None

    def apply(self, *args: Any) -> Any:
        if _LazyRowsInto._cls is None:
            _LazyRowsInto._cls = _rows_into_class()
        return _LazyRowsInto._cls.apply(*args)


_RowsInto = _LazyRowsInto()


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
               max_new_tokens: int = SMOKE_NEW_TOKENS) -> dict[str, Any]:
    """Greedy answers to a few training prompts: do they stop at end-of-turn, loop, carry the [Response] tag?

    Template mismatches show up here as answers that never stop or repeat forever; the result is reported, never
    raised, because tiny or briefly trained models fail it legitimately.
    """
    import torch

    from persllm.models import stop_token_ids

    stops = stop_token_ids(tokenizer)
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
            with torch.no_grad():
                generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                           eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            ids = generated[0, inputs["input_ids"].shape[1]:].tolist()
            outputs.append(_judge(ids, stops, tokenizer, keep_cot, messages[-1].content))
    finally:
        if merge:
            model.unmerge_adapter()
        model.train(was_training)
    problems = sorted({p for o in outputs for p in o["problems"]})
    return {"ok": bool(outputs) and not problems, "problems": problems, "outputs": outputs,
            "max_new_tokens": max_new_tokens}


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
