"""The interview (Character-LLM protocol): the judge rates open answers 1-7 on five rubric dimensions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from persllm.config import Project
from persllm.construct.retrieval import Retriever
from persllm.eval.criteria.base import Criterion, Inputs, by_key, judged, stage_names
from persllm.eval.generate import relevant_material
from persllm.eval.interview import DIMENSIONS, DOCS, PURPOSE, SCALE
from persllm.eval.judge import Outcome, Task, score_parser
from persllm.eval.render import num, table_html
from persllm.eval.runner import ModelRun, Plan
from persllm.prompts import Prompts
from persllm.types import Passage

_MATERIAL_TOKENS = 500


METHOD = ("Character-LLM interview: every model answers every question greedily, at the question's stage or, "
          "without one, at every stage. The judge rates each answer 1-7 on each dimension in a separate call, given "
          "the persona's name, the stage, the stage's material most relevant to the question, the question and the "
          "answer. hallucination: 7 = no invented facts; stability: 7 = fully in character. Per-answer means over the "
          "judge's repeats are averaged with a 95% t interval over answers; an unparseable reply is missing, never a "
          "score. At most eval.judge_items answers per model are judged.")


# -- judging ---------------------------------------------------------------------------------------------------------
def interview_tasks(project: Project, prompts: Prompts, runs: Sequence[ModelRun], plan: Plan,
                    passages: Sequence[Passage], limit: int) -> list[Task]:
    """One 1-7 judge task per answer and dimension, for at most `limit` answers per model.

    One call per dimension rather than one call for all five: a focused rubric keeps one dimension's impression from
    colouring the others (the halo effect), and a reply that does not parse loses one score, not five.
    """
    retrievers = {s.id: Retriever([p for p in passages if p.stage == s.id]) for s in project.stages}
    material: dict[tuple[str, str], str] = {}
    tasks = []
    for run in runs:
        index = by_key(run.answers)
        answered = [(q, stage) for q in plan.questions for stage in q.stages if _key(q.id, stage) in index][:limit]
        for q, stage in answered:
            if (q.id, stage) not in material:
                material[(q.id, stage)] = _material(retrievers[stage], q.question)
            names = stage_names(project, stage)
            for dim in DIMENSIONS:
                values = names | {"material": material[(q.id, stage)], "question": q.question,
                                  "answer": index[_key(q.id, stage)].visible,
                                  "dimension": prompts.get(f"judge.interview_dimensions.{dim}"),
                                  "rubric": prompts.fill(f"judge.interview_rubric.{dim}", **names)}
                tasks.append(Task("interview", run.model.name, f"{q.id}/{stage}/{dim}", "interview", values,
                                  score_parser(*SCALE), {"dimension": dim, "stage": stage, "question": q.id,
                                                         "topic": q.topic}))
    return tasks


def _key(question_id: str, stage: str) -> str:
    return f"{PURPOSE}/{question_id}/{stage}"


def _material(retriever: Retriever, question: str) -> str:
    """The stage's passages most relevant to the question (three quarters knowledge, a quarter own words)."""
    return "\n".join(p for p in relevant_material(retriever, question, _MATERIAL_TOKENS) if p) or "(no material)"


# -- report ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InterviewResult:
    """Per model: each rubric dimension's mean overall, by stage and by topic; or why the interview was not scored."""

    file: str  # eval.interview ("" when none is set)
    reason: str = ""  # why it was not scored ("" when it was)
    questions: int = 0
    answers: int = 0
    limit: int = 0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """report.json's "interview" section."""
        if not self.file:
            return {"enabled": False, "reason": self.reason}
        if self.reason:
            return {"enabled": False, "file": self.file, "reason": self.reason}
        return {"enabled": True, "file": self.file, "questions": self.questions, "answers": self.answers,
                "limit": self.limit, "dimensions": list(DIMENSIONS), "scale": list(SCALE), "method": METHOD,
                "models": self.models}


def result(project: Project, plan: Plan, names: Sequence[str], outcomes: Sequence[Outcome] | None,
           judge_reason: str) -> InterviewResult:
    """The interview section: per model, each dimension's mean with its 95% interval over answers."""
    if not project.eval.interview:
        return InterviewResult("", "no interview file: set eval.interview in persona.yaml or pass "
                                   f"--interview FILE (format: {DOCS})")
    if outcomes is None:
        return InterviewResult(project.eval.interview,
                               f"{judge_reason}; interviews are scored by the judge, so their questions were not asked")
    asked = sum(len(q.stages) for q in plan.questions)
    models: dict[str, Any] = {}
    for name in names:
        mine = [o for o in outcomes if o.task.model == name]
        stages = sorted({o.task.meta["stage"] for o in mine}, key=[s.id for s in project.stages].index)
        topics = sorted({o.task.meta["topic"] for o in mine if o.task.meta["topic"]})
        models[name] = {
            "judged_answers": len({(o.task.meta["question"], o.task.meta["stage"]) for o in mine}),
            "dimensions": _by_dimension(mine),
            "by_stage": {s: _by_dimension([o for o in mine if o.task.meta["stage"] == s]) for s in stages},
            "by_topic": {t: _by_dimension([o for o in mine if o.task.meta["topic"] == t]) for t in topics},
        }
    return InterviewResult(project.eval.interview, "", len(plan.questions), asked, project.eval.judge_items, models)


def _by_dimension(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Each dimension's estimate (mean, interval, n, missing), in the rubric's order."""
    scores = judged(outcomes, lambda o: o.task.meta["dimension"], (float(SCALE[0]), float(SCALE[1])))
    return {d: scores[d] for d in DIMENSIONS if d in scores}


def score(inputs: Inputs) -> InterviewResult:
    """The interview scores (when a file was given and a judge scored it)."""
    judge = inputs.judges.judge
    return result(inputs.project, inputs.plan, inputs.names, inputs.verdicts.get("interview") if judge else None,
                  inputs.judges.reason)


def summary(report: dict[str, Any], model: str) -> list[list[str]]:
    """The terminal row: each rubric dimension's mean (none when no interview file was given)."""
    line = summary_line(report, model)
    return [] if line is None else [[model, "interview (1-7)", line]]


def summary_line(report: dict[str, Any], model: str) -> str | None:
    """Each rubric dimension's mean, or why there are none; None when no interview file was given."""
    section = report.get("interview") or {}
    if not section.get("enabled"):
        return None if not section.get("file") else f"unavailable: {section.get('reason')}"
    dims = section["models"][model]["dimensions"]
    parts = [f"{d} {num(v)}" + (f" ({v['missing']} missing)" if v.get("missing") else "") for d, v in dims.items()]
    return " · ".join(parts) or "no answer could be judged"


def html(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    """The interview section: each rubric dimension per model, by stage and by topic."""
    """Per model and rubric dimension: mean [95% interval] n, with missing verdicts; reports without one say so."""
    section = r.get("interview") or {"reason": "not in this report (made before interviews existed)"}
    if not section.get("enabled"):
        return f"<p class='note'>Unavailable: {escape(section.get('reason', 'disabled'))}</p>"
    dims = section["dimensions"]
    low, high = section["scale"]
    rows = [[m, section["models"][m]["judged_answers"]] + [section["models"][m]["dimensions"].get(d) for d in dims]
            + [sum(v.get("missing", 0) for v in section["models"][m]["dimensions"].values())] for m in models]
    parts = [f"<p class='note'>{escape(section['method'])}</p>",
             (f"<p>{section['questions']} question(s) from {escape(section['file'])}, {section['answers']} answer(s) "
             f"per model; scale {low}-{high} (higher is better on every dimension).</p>"),
             table_html(["model", "answers judged"] + dims + ["missing verdicts"], rows).replace(
                 "<table>", "<table id='interview-table'>", 1)]
    for m in models:
        by_stage = section["models"][m]["by_stage"]
        if len(by_stage) > 1:
            parts.append(f"<details><summary>{escape(m)} by stage</summary>"
                         + table_html(["stage"] + dims, [[s] + [v.get(d) for d in dims] for s, v in by_stage.items()])
                         + "</details>")
        by_topic = section["models"][m].get("by_topic") or {}
        if by_topic:
            parts.append(f"<details><summary>{escape(m)} by topic</summary>"
                         + table_html(["topic"] + dims, [[t] + [v.get(d) for d in dims] for t, v in by_topic.items()])
                         + "</details>")
    return "".join(parts)


CRITERION = Criterion("interview", "interview", "Interview (Character-LLM rubric)", score, summary, html)
