"""Record types that flow between stages; only `to_record`/`from_record` turn them into JSON dicts."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

Role = Literal["system", "user", "assistant"]
MaterialKind = Literal["knowledge", "style"]
QuestionKind = Literal["ordinary", "opinion", "induced", "general"]
QUESTION_KINDS: tuple[str, ...] = ("ordinary", "opinion", "induced")


@dataclass(frozen=True, slots=True)
class NegativeType:
    """One kind of rejected answer for automated DPO: its name, who builds it and what the golden answer beats."""

    name: str
    built_by: Literal["construct", "pairs"]  # construct writes it per sample; pairs finds it in peers' samples
    beats: str  # what the persona's golden answer is preferred over


NEGATIVES: tuple[NegativeType, ...] = (
    NegativeType("other_stage", "construct", "the same question answered from another life stage's material"),
    NegativeType("other_persona", "pairs", "a peer persona's answer to a similar question"),
    NegativeType("non_personified", "construct", "a generic assistant's answer"),
    NegativeType("induced", "construct", "an answer that accepts the question's false premise"),
)
"""The one list of negative types; its order is the canonical one (config defaults, build order, stats)."""
NEGATIVE_TYPES: tuple[str, ...] = tuple(t.name for t in NEGATIVES)
CONSTRUCTED_NEGATIVES: tuple[str, ...] = tuple(t.name for t in NEGATIVES if t.built_by == "construct")


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message."""

    role: Role
    content: str
    name: str | None = None  # speaker in multi-agent transcripts


@dataclass(frozen=True, slots=True)
class Passage:
    """One paragraph (or part of a long one) of a persona's material, with provenance."""

    id: str  # stable: stage, kind and a hash of the text; unchanged when other lines move
    persona: str
    stage: str
    kind: MaterialKind
    text: str
    source: str  # file path relative to the project directory
    line: int  # 1-based line number in `source`
    part: int = 0  # index of the piece when a long paragraph was split


@dataclass(frozen=True, slots=True)
class Sample:
    """One annotated training/test item: a question and the persona's chain-of-thought answer."""

    id: str
    persona: str
    stage: str
    time_label: str
    kind: QuestionKind
    question: str
    analysis: str
    response: str
    seed_id: str  # passage the question was generated from ("" for general data)
    context_ids: tuple[str, ...] = ()  # retrieved passages given to the teacher
    split: Literal["train", "test", ""] = ""
    meta: dict[str, Any] = field(default_factory=dict)  # origin of each part, stance, premise, prompt version


@dataclass(frozen=True, slots=True)
class Negative:
    """A rejected-answer candidate for automated DPO, produced for one sample."""

    id: str
    sample_id: str
    type: str  # one of NEGATIVE_TYPES
    response: str  # the answer that should lose
    analysis: str = ""  # its own analysis, if it has one; else the pair reuses the chosen analysis
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """A DPO pair in TRL's conversational preference format, tagged with its negative type."""

    id: str
    sample_id: str
    negative_type: str
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    similarity: float = 0.0


@dataclass(frozen=True, slots=True)
class Probe:
    """An evaluation probe scored by phrase rules (docs/probes.md): any expect_any, all expect_all, one phrase of
    every expect_groups group, no reject_any, no year after reject_years_after, no year outside only_years (when
    given); garbage answers never pass."""

    id: str
    kind: str
    stage: str
    question: str
    expect_any: tuple[str, ...] = ()
    expect_all: tuple[str, ...] = ()
    reject_any: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    expect_groups: tuple[tuple[str, ...], ...] = ()
    reject_years_after: int | None = None
    only_years: tuple[int, ...] | None = None  # the years an answer may name (besides the question's); None: any


def stable_id(*parts: object, length: int = 16) -> str:
    """Return a short hex id derived only from `parts`, so re-runs produce the same id."""
    digest = hashlib.sha256()
    for i, part in enumerate(parts):  # = sha256 of the parts joined by \x1f, without building the joined string
        digest.update((("\x1f" if i else "") + str(part)).encode("utf-8"))
    return digest.hexdigest()[:length]


def to_record(obj: Any) -> dict[str, Any]:
    """Turn a record dataclass into a JSON-ready dict (tuples become lists, Messages dicts)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        out[f.name] = _plain(getattr(obj, f.name))
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        record = to_record(value)
        return {k: v for k, v in record.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


T = TypeVar("T")


def from_record(cls: type[T], record: dict[str, Any]) -> T:
    """Build record type `cls` from a dict written by `to_record`, ignoring unknown keys."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in record:
            continue
        value = record[f.name]
        if f.name == "prompt" and cls is PreferencePair:
            value = tuple(Message(**m) for m in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
