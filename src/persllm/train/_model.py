"""The model to tune: device and method checks, the quiet session loading and training run in, the tokenizer with
persllm's template and time tokens, the weights (base, base_model.adapter merged, 4-bit for QLoRA), the LoRA config.

The hooks persllm puts into TRL and PEFT while training live in _trainer.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from persllm import template
from persllm.config import Project, SFTConfig
from persllm.errors import ConfigError


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
    # nn.Module attributes are typed Tensor | Module; an input embedding's weight is its [vocab, dim] tensor.
    if len(tokenizer) > cast(torch.Tensor, model.get_input_embeddings().weight).shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    set_stop_tokens(model, tokenizer)
    if cuda and not quantize:
        # PreTrainedModel.to is wrapped with functools.wraps, which the stubs type as an unbound function.
        cast(torch.nn.Module, model).to(f"cuda:{local_gpu()}")
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
