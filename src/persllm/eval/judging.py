"""Judge tasks for each judged criterion, bounded by eval.judge_items, and the judge's reliability note."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from persllm import text as T
from persllm.config import Project
from persllm.eval import ipip
from persllm.eval.criteria import by_key
from persllm.eval.judge import Judge, Outcome, Task, parse_profile, parse_winner, score_parser
from persllm.eval.runner import ModelRun, Plan
from persllm.prompts import Prompts
from persllm.types import Passage, Sample


@dataclass(frozen=True)
class Judges:
    """The judge (None when eval.judge_items is 0) and the teacher that estimates Big Five targets (or None)."""

    judge: Judge | None
    teacher: Judge | None
    reason: str  # why there is no judge


UNRELIABLE = ("Judge scores from the embedded 270M model are unreliable: a model that small cannot rate answers. "
              "Set `judge: openai:MODEL` (or any stronger model) in persona.yaml for scores you can trust.")
_TARGET_TOKENS = 600


def aspect(sample_kind: str) -> str:
    """The paper's item typing, read from the construct kind: opinions are attitude items, the rest knowledge."""
    return "attitude" if sample_kind == "opinion" else "knowledge"


def _names(project: Project, stage: str) -> dict[str, str]:
    return {"name": project.name, "label": project.stage(stage).label}


def accuracy_tasks(project: Project, prompts: Prompts, runs: Sequence[ModelRun], heldout: Sequence[Sample],
                   limit: int) -> list[Task]:
    """0-5 agreement of each model's greedy answer with the golden answer (knowledge or attitude)."""
    tasks = []
    for run in runs:
        index = by_key(run.answers)
        for s in [s for s in heldout if f"heldout/{s.id}" in index][:limit]:
            kind = aspect(s.kind)
            values = _names(project, s.stage) | {"question": s.question, "reference": s.response,
                                                 "answer": index[f"heldout/{s.id}"].visible,
                                                 "aspect": prompts.get(f"judge.aspects.{kind}")}
            tasks.append(Task("accuracy", run.model.name, s.id, "accuracy", values, score_parser(0, 5),
                              {"aspect": kind, "stage": s.stage}))
    return tasks


def probe_tasks(project: Project, prompts: Prompts, runs: Sequence[ModelRun], plan: Plan, limit: int) -> list[Task]:
    """0-5 agreement with the probe's reference answer, for probes that carry one."""
    tasks = []
    for run in runs:
        index = by_key(run.answers)
        probes = [p for p in plan.probes if p.meta.get("reference") and f"probe/{p.id}" in index][:limit]
        for probe in probes:
            kind = "attitude" if probe.kind == "stance" else "knowledge"
            values = _names(project, probe.stage) | {"question": probe.question, "reference": probe.meta["reference"],
                                                     "answer": index[f"probe/{probe.id}"].visible,
                                                     "aspect": prompts.get(f"judge.aspects.{kind}")}
            tasks.append(Task("probe", run.model.name, probe.id, "accuracy", values, score_parser(0, 5),
                              {"kind": probe.kind}))
    return tasks


def pairwise_tasks(project: Project, runs: Sequence[ModelRun], heldout: Sequence[Sample], limit: int) -> list[Task]:
    """Every pair of models on the same held-out items, each comparison asked in both orders."""
    tasks = []
    for left, right in itertools.combinations(runs, 2):
        li, ri = by_key(left.answers), by_key(right.answers)
        items = [s for s in heldout if f"heldout/{s.id}" in li and f"heldout/{s.id}" in ri][:limit]
        for s in items:
            first, second = li[f"heldout/{s.id}"].visible, ri[f"heldout/{s.id}"].visible
            base = _names(project, s.stage) | {"question": s.question, "reference": s.response}
            for order, (a, b) in (("ab", (first, second)), ("ba", (second, first))):
                meta = {"a": left.model.name, "b": right.model.name, "order": order, "item": s.id}
                tasks.append(Task("pairwise", f"{left.model.name}|{right.model.name}", f"{s.id}/{order}", "pairwise",
                                  base | {"answer_a": a, "answer_b": b}, parse_winner, meta))
    return tasks


def interview_tasks(project: Project, runs: Sequence[ModelRun], plan: Plan) -> list[Task]:
    """1-5 rating of how well each IPIP statement describes the persona, from its interview answer."""
    tasks = []
    for run in runs:
        index = by_key(run.answers)
        for stage in plan.ipip_stages:
            for item in plan.interview:
                answer = index.get(f"interview/{item.id}/{stage}")
                if answer is None:
                    continue
                values = _names(project, stage) | {"statement": ipip.statement(item, project.language),
                                                   "question": answer.question, "answer": answer.visible}
                tasks.append(Task("ipip", run.model.name, f"{item.id}/{stage}", "ipip", values, score_parser(1, 5),
                                  {"stage": stage, "item": item.id}))
    return tasks


def interview_scores(outcomes: Sequence[Outcome]) -> dict[tuple[str, str], dict[str, float]]:
    """(model, stage) -> item id -> mean judge rating (items missing in every repeat are left out)."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for outcome in outcomes:
        estimate = outcome.estimate()
        key = (outcome.task.model, outcome.task.meta["stage"])
        out.setdefault(key, {})
        if estimate.mean is not None:
            out[key][outcome.task.meta["item"]] = estimate.mean
    return out


def target_tasks(project: Project, passages: Sequence[Passage], stages: Sequence[str]) -> list[Task]:
    """The teacher's Big Five estimate of the persona at each stage, from a slice of the stage's material."""
    tasks = []
    for stage in stages:
        texts = [p.text for p in passages if p.stage == stage and p.kind == "knowledge"][:6]
        texts += [p.text for p in passages if p.stage == stage and p.kind == "style"][:6]
        material = T.truncate_tokens("\n".join(texts), _TARGET_TOKENS)
        tasks.append(Task("target", "", stage, "target", _names(project, stage) | {"material": material},
                          parse_profile, {"stage": stage}))
    return tasks


def targets_from(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    """Stage -> mean profile over the repeats that parsed (None when every repeat was unparseable)."""
    out: dict[str, dict[str, Any]] = {}
    for outcome in outcomes:
        parsed = outcome.parsed
        profile = {d: round(sum(p[d] for p in parsed) / len(parsed), 3) for d in ipip.DOMAINS} if parsed else None
        out[outcome.task.meta["stage"]] = {"profile": profile, "repeats": len(parsed),
                                           "missing": len(outcome.values) - len(parsed)}
    return out


def verdict_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts of judge replies by status, so unparseable output is visible in the report."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return {"replies": len(records), **counts}
