"""What every criterion shares: the inputs it is scored from, its table entry, and the common scoring helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from persllm.config import Project
from persllm.eval.generate import Answer
from persllm.eval.judge import Judges, Outcome
from persllm.eval.metrics import mean_ci
from persllm.eval.runner import ModelRun, Persona, Plan
from persllm.text import time_phrase

Embed = Callable[[list[str]], list[list[float]]]
Rows = list[list[str]]  # terminal summary rows [model, criterion, result]


@dataclass(frozen=True)
class Inputs:
    """Everything a criterion is scored from: what was asked, every model's runs and the judge's verdicts."""

    project: Project
    names: tuple[str, ...]  # the models, in eval.models order
    runs: dict[str, ModelRun]
    plan: Plan
    peers: tuple[Persona, ...]
    peer_notes: tuple[str, ...]  # peers that could not be loaded
    inter_notes: dict[str, list[str]]  # per model: why it could not play a peer
    judges: Judges
    verdicts: dict[str, Any]  # judge task kind -> outcomes
    embed: Embed | None
    embed_note: str | None  # why there is no embedding variant
    probe_scores: dict[str, dict[str, Any]]  # per model; the probes and anti-induction criteria both read them


class Result(Protocol):
    """A criterion's typed result record."""

    def to_json(self) -> dict[str, Any]:
        """Its report.json section."""
        ...


def _no_rows(report: dict[str, Any]) -> Rows:
    return []


@dataclass(frozen=True)
class Criterion:
    """One criterion's entry in the ordered table: its sections in report.json and report.html, its terminal rows.

    The renderers read report.json (a stored report is shown again by `persllm report` and compared by
    `persllm compare`), so they take the JSON section, not the typed record.
    """

    key: str  # its report.json section
    anchor: str  # its report.html section id
    title: str  # its report.html heading
    score: Callable[[Inputs], Result]
    summary: Callable[[dict[str, Any], str], Rows]  # the terminal rows of one model
    html: Callable[[dict[str, Any], list[str], dict[str, str]], str]  # its report.html section body
    summary_after: Callable[[dict[str, Any]], Rows] = _no_rows  # terminal rows after every model's


def by_key(answers: Sequence[Answer]) -> dict[str, Answer]:
    """Answers of one model indexed by ask key, leaving out failed generations."""
    return {a.key: a for a in answers if not a.error}


def stage_names(project: Project, stage: str) -> dict[str, str]:
    """The persona's name and a stage's label, the values every judge prompt fills in."""
    return {"name": project.name, "label": time_phrase(project.stage(stage).label, project.language)}


def judged(outcomes: Sequence[Outcome], group: Callable[[Outcome], str],
           bounds: tuple[float, float] = (0.0, 5.0)) -> dict[str, Any]:
    """Mean of per-item judge means with a t interval over items, grouped; items missing in every repeat counted."""
    groups: dict[str, list[float]] = {}
    missing: dict[str, int] = {}
    for outcome in outcomes:
        key = group(outcome)
        estimate = outcome.estimate()
        if estimate.mean is None:
            missing[key] = missing.get(key, 0) + 1
            groups.setdefault(key, [])
            continue
        groups.setdefault(key, []).append(estimate.mean)
    return {k: {**mean_ci(v, bounds).as_dict(), "missing": missing.get(k, 0)} for k, v in sorted(groups.items())}
