"""Probes: pass rates of rule-checked questions per kind, paired model comparisons, judge references."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from persllm import template
from persllm.config import Project
from persllm.eval.criteria.base import Criterion, Inputs, by_key, judged, stage_names
from persllm.eval.generate import Answer
from persllm.eval.judge import Task, score_parser
from persllm.eval.metrics import paired, rate_ci
from persllm.eval.probes import score_probe
from persllm.eval.render import bars_html, ci, pct, table_html
from persllm.eval.runner import ModelRun, Plan
from persllm.prompts import Prompts
from persllm.types import Probe


def probe_scores(answers: Sequence[Answer], probes: Sequence[Probe],
                 prompts: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Pass rates per kind (Wilson intervals), each probe's result, every failing answer, identity-break counts.

    `prompts` maps a stage to its (system prompt, stage description), so an answer reciting them fails.
    """
    index = by_key(answers)
    results: dict[str, list[bool]] = {}
    rejected: dict[str, list[bool]] = {}
    passed: dict[str, bool] = {}
    failures, missing = [], 0
    for probe in probes:
        answer = index.get(f"probe/{probe.id}")
        if answer is None:
            missing += 1
            continue
        system, description = (prompts or {}).get(probe.stage, ("", ""))
        result = score_probe(probe, answer.visible, system, description)
        passed[probe.id] = result.passed
        results.setdefault(probe.kind, []).append(result.passed)
        rejected.setdefault(probe.kind, []).append(result.rejected)
        if not result.passed:
            failures.append({"probe_id": probe.id, "kind": probe.kind, "stage": probe.stage,
                             "question": probe.question, "answer": answer.visible, "reasons": list(result.reasons)})
    flat = [r for rs in results.values() for r in rs]
    return {"overall": _rate(flat), "by_kind": {k: _rate(v) for k, v in sorted(results.items())},
            "rejected_by_kind": {k: _rate(v) for k, v in sorted(rejected.items())},
            "results": passed, "failures": failures, "missing": missing}


def paired_probes(scores: dict[str, dict[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    """Every pair of models on the probes both answered: difference of pass rates (interval) and McNemar's p."""
    out = []
    for a, b in itertools.combinations(models, 2):
        ra, rb = scores[a]["results"], scores[b]["results"]
        shared = [k for k in ra if k in rb]
        test = paired([ra[k] for k in shared], [rb[k] for k in shared])
        out.append({"a": a, "b": b, **test.as_dict()})
    return out


def _rate(values: Sequence[bool]) -> dict[str, Any]:
    return rate_ci(sum(values), len(values)).as_dict() | {"passed": sum(values)}


def probe_tasks(project: Project, prompts: Prompts, runs: Sequence[ModelRun], plan: Plan, limit: int) -> list[Task]:
    """0-5 agreement with the probe's reference answer, for probes that carry one."""
    tasks = []
    for run in runs:
        index = by_key(run.answers)
        probes = [p for p in plan.probes if p.meta.get("reference") and f"probe/{p.id}" in index][:limit]
        for probe in probes:
            kind = "attitude" if probe.kind == "stance" else "knowledge"
            values = stage_names(project, probe.stage) | {"question": probe.question,
                                                          "reference": probe.meta["reference"],
                                                          "answer": index[f"probe/{probe.id}"].visible,
                                                          "aspect": prompts.get(f"judge.aspects.{kind}")}
            tasks.append(Task("probe", run.model.name, probe.id, "accuracy", values, score_parser(0, 5),
                              {"kind": probe.kind}))
    return tasks


def paired_text(pair: dict[str, Any]) -> str:
    """'+23 points [+5, +40], McNemar p=0.01 (n=30)': one paired comparison of pass rates."""
    d = pair["difference"]
    if d.get("mean") is None:
        return "no shared probes"
    return (f"{100 * d['mean']:+.0f} points [{100 * d['low']:+.0f}, {100 * d['high']:+.0f}], McNemar p="
            f"{pair['p_value']:.2g} (n={pair['n']}, {pair['only_b']} only {pair['b']}, {pair['only_a']} only "
            f"{pair['a']})")


RULE = ("pass = not garbage (empty, repeating itself, echoing the question or the system prompt, a generic assistant "
        "reply), one phrase of every expect_groups group, any expect_any phrase, all expect_all phrases, no "
        "reject_any phrase, no year after reject_years_after (case-insensitive, whole words), scored on the visible "
        "answer (no analysis)")


@dataclass(frozen=True)
class ProbesResult:
    """Probe pass rates per model, the paired comparisons between models, and how many probes of each kind."""

    paired: list[dict[str, Any]]
    by_stage: dict[str, int]
    kinds: dict[str, int]
    models: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """report.json's "probes" section."""
        return {"paired": self.paired, "by_stage": self.by_stage, "rule": RULE, "kinds": self.kinds,
                "models": self.models}


def model_scores(project: Project, runs: dict[str, ModelRun], plan: Plan, names: Sequence[str],
                 verdicts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each model's probe results with the judge's reference scores (probes and anti-induction both read them)."""
    prompts = {s.id: (template.system_prompt(template.context_for(project, s.id)), s.description.strip())
               for s in project.stages}
    scores = {m: probe_scores(runs[m].answers, plan.probes, prompts) for m in names}
    for m in names:
        mine = [o for o in verdicts.get("probe", []) if o.task.model == m]
        scores[m]["judge"] = judged(mine, lambda o: o.task.meta["kind"])
    return scores


def score(inputs: Inputs) -> ProbesResult:
    """The probe section from the scores every model already has."""
    probes = inputs.plan.probes
    return ProbesResult(paired_probes(inputs.probe_scores, inputs.names),
                        {s.id: sum(1 for p in probes if p.stage == s.id) for s in inputs.project.stages},
                        {k: sum(1 for p in probes if p.kind == k) for k in sorted({p.kind for p in probes})},
                        inputs.probe_scores)


def summary(report: dict[str, Any], model: str) -> list[list[str]]:
    """The terminal row: passes out of probes, with the rate per kind."""
    probes = report["probes"]["models"][model]
    kinds = ", ".join(f"{k} {pct(v)}" for k, v in probes["by_kind"].items())
    return [[model, "probes", (f"{probes['overall'].get('passed', 0)}/{probes['overall']['n']} pass "
             f"({pct(probes['overall'])} {ci(probes['overall'])}); {kinds}")]]


def summary_after(report: dict[str, Any]) -> list[list[str]]:
    """The rows after every model's: one per paired comparison."""
    return [[f"{pair['b']} vs {pair['a']}", "paired probes", paired_text(pair)]
            for pair in report["probes"].get("paired", [])]


def html(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    """The probes section: pass rates per kind, paired comparisons, judge scores, failing answers."""
    p = r["probes"]
    kinds = sorted(p["kinds"])
    rows = [[m, p["models"][m]["overall"]] + [p["models"][m]["by_kind"].get(k) for k in kinds] for m in models]
    parts = [f"<p class='note'>{escape(p['rule'])}</p>", table_html(["model", "all"] + kinds, rows),
             bars_html("Probe pass rate by kind", kinds, {m: [p["models"][m]["by_kind"].get(k) for k in kinds]
                                                         for m in models}, palette, ymax=1.0)]
    if p.get("paired"):
        parts.append("<h3 id='paired'>Paired comparisons on the same probes</h3><p class='note'>Difference of pass "
                     "rates (second minus first) with Newcombe's 95% interval for paired proportions, and the "
                     "two-sided exact McNemar p on the probes only one of the two passed. An interval that "
                     "contains 0 (or p &gt;= 0.05) means the probes cannot tell the two models apart.</p>")
        parts.append(table_html(["first", "second", "n", "first passes", "second passes", "difference [95% CI]",
                             "only first", "only second", "McNemar p"],
                            [[x["a"], x["b"], x["n"], x["a_rate"], x["b_rate"], x["difference"], x["only_a"],
                              x["only_b"], x["p_value"]] for x in p["paired"]]))
    judged = {m: p["models"][m].get("judge", {}) for m in models}
    if any(judged.values()):
        parts.append("<h3>Judge scores against the probe references (0-5)</h3>")
        parts.append(table_html(["model"] + kinds, [[m] + [judged[m].get(k) for k in kinds] for m in models]))
    for m in models:
        failures = p["models"][m]["failures"]
        items = "".join(f"<li class='fail'><b>{escape(f['probe_id'])}</b> [{escape(f['kind'])}/{escape(f['stage'])}] "
                        f"Q: {escape(f['question'])}<br>A: {escape(f['answer'] or '(empty)')}<br>"
                        f"<i>{escape('; '.join(f['reasons']))}</i></li>" for f in failures)
        parts.append(f"<details><summary>{escape(m)}: {len(failures)} failing answer(s)</summary><ul>{items}</ul>"
                     "</details>")
    return "".join(parts)


CRITERION = Criterion("probes", "probes", "Probes", score, summary, html, summary_after)
