"""SFT records in TRL's conversational format: personified samples (repeated) mixed with general conversations."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from persllm import template
from persllm.config import Project
from persllm.errors import DataError
from persllm.general import GeneralSource
from persllm.types import Message, PreferencePair, Sample

PERSONIFIED_KINDS: tuple[str, ...] = ("ordinary", "opinion", "induced", "general")


def persona_context(project: Project, stage_id: str) -> template.PersonaContext:
    """What the system prompt needs for the persona at one stage (stage index drives the time token)."""
    if stage_id not in {s.id for s in project.stages}:
        raise DataError(f"sample stage {stage_id!r} is not a stage of {project.name} "
                        f"({', '.join(s.id for s in project.stages)}); re-run `persllm construct` after changing "
                        "stages")
    return template.context_for(project, stage_id)


def prompt_for(project: Project, stage_id: str, question: str, history: Sequence[Message] = ()) -> list[Message]:
    """The exact prompt (system + turns + question) the tuned model sees for a question at a stage."""
    return template.prompt_messages(persona_context(project, stage_id), question, history)


def sample_prompt(project: Project, sample: Sample) -> list[Message]:
    """The exact training prompt of a sample; evaluation and serving use this to match training."""
    return prompt_for(project, sample.stage, sample.question)


def answer_text(project: Project, analysis: str, response: str) -> str:
    """Assistant text in the trained format ([Analysis] ... [Response] ..., or the response only)."""
    return template.format_answer(analysis, response, keep_cot=project.sft.keep_cot)


def sample_messages(project: Project, sample: Sample) -> list[Message]:
    """Prompt plus golden answer of one sample."""
    return sample_prompt(project, sample) + [Message("assistant", answer_text(project, sample.analysis,
                                                                                sample.response))]


def to_chat(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Messages as the role/content dicts chat templates take."""
    return [{"role": m.role, "content": m.content} for m in messages]


def general_conversation(messages: Sequence[Message]) -> list[Message] | None:
    """A general conversation cut after its last assistant turn; None if it has no non-empty assistant turn."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant" and m.content.strip()), default=-1)
    if last < 0:
        return None
    return [m for m in messages[: last + 1] if m.content.strip() or m.role == "assistant"]


@dataclass(frozen=True)
class MixRecord:
    """One conversation of the SFT mix and where it came from (exports keep the origin; training drops it)."""

    messages: tuple[Message, ...]
    origin: str  # "persona" (a constructed sample, repeated sft.repeat times) or "general" (a general conversation)
    kind: str  # the sample's kind (ordinary, opinion, induced, general), or "general" for a general conversation
    source_id: str  # the sample id, or general-<index> of the general conversation


def sft_mix(project: Project, samples: Sequence[Sample], general: Sequence[Sequence[Message]],
            general_source: GeneralSource | None = None) -> tuple[list[MixRecord], dict[str, Any]]:
    """The SFT mix: train samples x sft.repeat plus general data, shuffled with the seed; with its counts.

    The counts say how many of each went in, the realised general/personified ratio (sft.general_ratio within
    rounding), whether general conversations had to be repeated to reach it, and where they came from."""
    sft = project.sft
    personified = [s for s in samples if s.split == "train" and s.kind in PERSONIFIED_KINDS]
    kinds = Counter(s.kind for s in personified)
    records = [MixRecord(tuple(sample_messages(project, s)), "persona", s.kind, s.id) for s in personified
               for _ in range(max(1, sft.repeat))]
    rng = random.Random(project.seed)
    conversations = [(i, c) for i, c in ((i, general_conversation(g)) for i, g in enumerate(general)) if c]
    wanted = round(sft.general_ratio * len(records)) if conversations else 0
    picked = _sample_indices(len(conversations), wanted, rng)
    records.extend(MixRecord(tuple(conversations[i][1]), "general", "general", f"general-{conversations[i][0]}")
                   for i in picked)
    rng.shuffle(records)
    n_personified = len(records) - len(picked)
    counts: dict[str, Any] = {
        "personified_samples": len(personified), "personified": n_personified, "general": len(picked),
        "general_available": len(conversations), "records": len(records),
        **{f"kind_{k}": v for k, v in sorted(kinds.items())},
        "general_ratio": sft.general_ratio,
        "general_ratio_realised": round(len(picked) / n_personified, 4) if n_personified else 0.0,
        "general_distinct": len(set(picked)),
        # fewer conversations than wanted: each is used in whole passes (plus a sample), not once
        "general_repeated": len(picked) > len(conversations)}
    if general_source is not None:
        counts["general_source"] = general_source.to_dict()
    return records, counts


def build_sft_records(project: Project, samples: Sequence[Sample], general: Sequence[Sequence[Message]],
                      general_source: GeneralSource | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training records `{"messages": [...]}` of the SFT mix (see sft_mix), with its counts."""
    mix, counts = sft_mix(project, samples, general, general_source)
    return [{"messages": to_chat(r.messages)} for r in mix], counts


def _sample_indices(available: int, wanted: int, rng: random.Random) -> list[int]:
    """`wanted` indices out of `available`: without replacement when possible, else whole passes plus a sample."""
    if available <= 0 or wanted <= 0:
        return []
    full, rest = divmod(wanted, available)
    return [i for _ in range(full) for i in range(available)] + rng.sample(range(available), rest)


def pair_record(pair: PreferencePair) -> dict[str, Any]:
    """A pair in TRL's conversational preference format."""
    return {"prompt": to_chat(pair.prompt), "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}]}
