"""Intermediate records of data construction (final ones are types.Sample and types.Negative)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from persllm.construct.plan import Slot
from persllm.construct.retrieval import Context


@dataclass(frozen=True)
class Question:
    """A generated question and where it came from ("teacher" or "template")."""

    text: str
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the false premise an induced question carries


@dataclass(frozen=True)
class Answer:
    """An analysis and an in-character response; `origin` says who wrote it ("teacher", "grounded")."""

    analysis: str
    response: str
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Draft:
    """A question with the context retrieved for it, waiting for its answer."""

    slot: Slot
    question: Question
    context: Context


@dataclass(frozen=True)
class GeneralItem:
    """A general instruction to re-answer in the persona's voice at one stage."""

    id: str
    stage: str
    instruction: str
    reference: str
    known_since: int | None
    style: str
    style_ids: tuple[str, ...]

    @property
    def known_since_text(self) -> str:
        """Year for prompts ('500 BCE' for negative years, 'unknown' when not given)."""
        if self.known_since is None:
            return "unknown"
        return f"{-self.known_since} BCE" if self.known_since < 0 else str(self.known_since)
