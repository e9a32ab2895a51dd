"""What every export format writes: the records `persllm train` trains on, and the settings it trains them with.

The SFT records are the training mix itself (sft_mix: personified samples x sft.repeat plus general conversations,
shuffled with the seed, too-long ones dropped as SFT drops them), the DPO pairs are the ones the dpo stage builds
(train split for training, test split as the eval set), and the hyper-parameters, base model, turn markers, chat
template and stage tokens are the ones persllm's trainers use.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from persllm import template
from persllm.config import Project
from persllm.train.data import PERSONIFIED_KINDS, MixRecord, pair_record, sample_messages, sft_mix, to_chat
from persllm.types import Message, PreferencePair, Sample

_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@dataclass(frozen=True)
class Bundle:
    """Records and settings shared by every export format."""

    project: Project
    sft_train: tuple[MixRecord, ...]  # the SFT mix in training order
    sft_test: tuple[MixRecord, ...]  # held-out personified samples, once each (the eval set)
    dpo_train: tuple[PreferencePair, ...]
    dpo_test: tuple[PreferencePair, ...]
    base_model: str  # the transformers checkpoint persllm fine-tunes
    markers: tuple[str, str]  # turn start and end markers of the base model's template
    training_template: str  # the chat template SFT trains with ({% generation %} marks the trained tokens)
    stage_tokens: tuple[str, ...]  # <TIME-I>, ... with temporal_labels=tokens, else none
    trainable_tokens: tuple[str, ...]  # tokens whose embedding rows SFT trains besides LoRA (markers, stage tokens)
    trainable_token_ids: tuple[int, ...]  # their ids once the stage tokens are added in this order
    tied_embeddings: bool
    bf16: bool  # persllm trains in bf16 on a CUDA GPU that has it, else in fp32
    bos_in_template_only: bool = False  # the template writes BOS, plain encoding does not add it (see llamafactory)
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def end_marker(self) -> str:
        """The end-of-turn marker every trained assistant turn ends with."""
        return self.markers[1]

    @property
    def chat_template(self) -> str:
        """The training template without TRL's {% generation %} tags (for tools that find the answer themselves)."""
        return inference_template(self.training_template)

    @property
    def name(self) -> str:
        """Dataset name prefix: persllm_<slug>."""
        return f"persllm_{self.project.slug.replace('-', '_')}"


def inference_template(training: str) -> str:
    """A chat template without {% generation %} / {% endgeneration %} (same text, no assistant-mask markers)."""
    return _GENERATION_TAG.sub("", training)


def build_bundle(project: Project, samples: Sequence[Sample], pairs: Sequence[PreferencePair],
                 general: Sequence[Sequence[Message]], tokenizer: Any = None, added: Sequence[int] = (),
                 base_model: str | None = None) -> Bundle:
    """The records and settings of `persllm train` for this project (loads the base tokenizer unless given one)."""
    from persllm.backends import base_model_path
    from persllm.train import _model
    from persllm.train._trainer import conversation_tokens, use_bf16
    from persllm.train.dpo import pair_tokens
    from persllm.train.pairs import pairs_by_split

    if tokenizer is None:
        tokenizer, added = _model.base_tokenizer(project)
    base = base_model or base_model_path(project.base_model)
    mix, counts = sft_mix(project, samples, general)
    sft_len, dpo_len = project.sft.max_length, project.dpo.max_length
    train = [r for r in mix if conversation_tokens(tokenizer, to_chat(r.messages)) <= sft_len]  # as SFT drops them
    test = [MixRecord(tuple(sample_messages(project, s)), "persona", s.kind, s.id) for s in samples
            if s.split == "test" and s.kind in PERSONIFIED_KINDS]
    split = pairs_by_split(pairs, samples)
    dpo_train = [p for p in split.get("train", []) if pair_tokens(tokenizer, pair_record(p)) <= dpo_len]
    dpo_test = [p for p in split.get("test", []) if pair_tokens(tokenizer, pair_record(p)) <= dpo_len]
    vocab = tokenizer.get_vocab()
    ids = _model.trained_token_ids(tokenizer, added)
    counts = counts | {"dropped_too_long": len(mix) - len(train), **record_counts(train),
                       "sft_test": len(test), "dpo_train": len(dpo_train), "dpo_test": len(dpo_test),
                       "dpo_dropped_too_long": len(split.get("train", [])) - len(dpo_train)}
    return Bundle(project=project, sft_train=tuple(train), sft_test=tuple(test), dpo_train=tuple(dpo_train),
                  dpo_test=tuple(dpo_test), base_model=str(base), markers=template.markers_for(vocab),
                  training_template=training_template(tokenizer), stage_tokens=tuple(_model.time_tokens(project)),
                  trainable_tokens=tuple(tokenizer.convert_ids_to_tokens(ids)), trainable_token_ids=tuple(ids),
                  tied_embeddings=_tied(base), bf16=use_bf16(), bos_in_template_only=_bos_in_template_only(tokenizer),
                  counts=counts)


def record_counts(records: Sequence[MixRecord]) -> dict[str, int]:
    """Exported SFT records by origin and kind: sft_records, sft_persona, sft_general, sft_kind_<kind>."""
    origins = Counter(r.origin for r in records)
    kinds = Counter(r.kind for r in records if r.origin == "persona")
    return {"sft_records": len(records), "sft_persona": origins["persona"], "sft_general": origins["general"],
            **{f"sft_kind_{k}": v for k, v in sorted(kinds.items())}}


def training_template(tokenizer: Any) -> str:
    """The chat template SFT trains with: the tokenizer's, or TRL's training version of it (as SFTTrainer swaps)."""
    from trl.chat_template_utils import get_training_chat_template

    current = tokenizer.chat_template
    if isinstance(current, dict):
        current = current["default"]
    return get_training_chat_template(tokenizer) or current


def chat(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Role/content dicts with contents trimmed as the chat template trims them (tools that fill their own
    template slots, such as LLaMA-Factory's, would otherwise keep the surrounding whitespace)."""
    return [{"role": m.role, "content": m.content.strip()} for m in messages]


def pair_answer(pair: PreferencePair, side: str) -> str:
    """The chosen or rejected answer, trimmed."""
    return (pair.chosen if side == "chosen" else pair.rejected).strip()


def hyper(project: Project) -> dict[str, Any]:
    """Every hyper-parameter persllm trains with, in neutral names (each format maps them to its own)."""
    from persllm.train._model import target_modules
    from persllm.train.dpo import DPO_WARMUP
    from persllm.train.sft import SFT_SCHEDULER

    sft, dpo = project.sft, project.dpo
    lora = {"method": sft.method, "r": sft.lora_r, "alpha": sft.lora_alpha, "dropout": sft.lora_dropout,
            "targets": target_modules(sft.target_modules)}
    return {
        "seed": project.seed, "lora": lora,
        "sft": {"learning_rate": sft.learning_rate, "epochs": sft.epochs, "max_steps": sft.max_steps,
                "batch_size": sft.batch_size, "grad_accum": sft.grad_accum, "warmup_ratio": sft.warmup_ratio,
                "weight_decay": sft.weight_decay, "max_length": sft.max_length, "save_steps": max(1, sft.save_steps),
                "token_lr_ratio": sft.token_lr_ratio, **SFT_SCHEDULER},
        "dpo": {"learning_rate": dpo.learning_rate, "epochs": dpo.epochs, "max_steps": dpo.max_steps,
                "batch_size": dpo.batch_size, "grad_accum": dpo.grad_accum, "warmup_ratio": DPO_WARMUP,
                "weight_decay": 0.0, "max_length": dpo.max_length, "save_steps": max(1, dpo.save_steps),
                "beta": dpo.beta, "sft_weight": dpo.sft_weight, "lr_scheduler_type": "linear"},
    }


def manifest(bundle: Bundle, fmt: str, files: Sequence[Any]) -> dict[str, Any]:
    """export.json: what was exported, from which base, with which markers and tokens, and how many of each."""
    from persllm import __version__

    return {"format": fmt, "persllm": __version__, "template_version": template.VERSION,
            "project": bundle.project.name, "base_model": bundle.base_model, "turn_markers": list(bundle.markers),
            "stage_tokens": list(bundle.stage_tokens), "trainable_tokens": list(bundle.trainable_tokens),
            "temporal_labels": bundle.project.sft.temporal_labels, "hyper_parameters": hyper(bundle.project),
            "counts": bundle.counts, "files": [str(f) for f in files]}


def _tied(base: str) -> bool:
    """Whether the base model ties its LM head to the input embedding (True where unknown, the usual case)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError):
        return True
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", True))


def _bos_in_template_only(tokenizer: Any) -> bool:
    """True when the chat template writes BOS but encoding text does not add it (tools that take the template's
    prefix from `encode("")`, as LLaMA-Factory does, then repeat BOS in every turn)."""
    bos = tokenizer.bos_token
    if not bos:
        return False
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    return rendered.startswith(bos) and not tokenizer.decode(tokenizer.encode("")).startswith(bos)
