"""The psychological scale: IPIP-NEO-120 Big Five profiles (choices and judged interviews) against targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from persllm import text as T
from persllm.config import Project
from persllm.eval import charts, ipip
from persllm.eval.criteria.base import Criterion, Inputs, by_key, stage_names
from persllm.eval.judge import Outcome, Task, parse_profile, score_parser
from persllm.eval.metrics import rate_ci
from persllm.eval.render import fmt, num, table_html
from persllm.eval.runner import ModelRun, Persona, Plan
from persllm.types import Passage

METHOD = ("Choice: for local models, the log-likelihood of the options 1-5 after the answer prefix, from one "
          "batched pass over all 120 items, with contextual calibration (each option's mean log-probability "
          "over the items is subtracted before taking the best, so a model's preference for one label does not "
          "decide its profile; the uncalibrated answer counts are shown too); for other backends, a generated "
          "digit. "
          "Interview: an open question per item, rated 1-5 by the judge. Minus-keyed items are reversed "
          "(6 - answer); domains sum 24 items (24-120), facets 4 (4-20); profiles compare domain means (1-5). "
          "Dimension accuracy (InCharacter): the share of target domains whose measured mean lies on the "
          "target's side of 3 (a label high/low, or a number above/below 3), with a Wilson interval; a measured "
          "3 is a miss and a numeric target of exactly 3 is not counted.")


def ipip_summary(admin: dict[str, Any], interview: dict[str, float] | None, language: str) -> dict[str, Any]:
    """Scores of one administration (and of the judged interview, when there is one)."""
    inventory = ipip.items(language)
    choice = ipip.score(admin["answers"], inventory)
    out = {"method": admin["method"], "missing": admin["missing"], **choice, "answers": dict(admin["answers"])}
    if "raw_answers" in admin:  # the uncalibrated argmax, to show how strongly the model prefers one label
        raw = admin["raw_answers"].values()
        out["option_mass"] = admin["option_mass"]
        out["raw_option_counts"] = {str(k): sum(1 for v in raw if v == k) for k in range(1, 6)}
        out["raw_domain_mean"] = ipip.score(admin["raw_answers"], inventory)["domain_mean"]
    if interview is not None:
        scored = ipip.score(interview, inventory)
        out["interview"] = {"answered": scored["answered"], "domain_mean": scored["domain_mean"]}
    return out


def target_side(value: float | str | None) -> str | None:
    """Which side of the 1-5 scale's midpoint a target names: its label, or high above 3 and low below (3: none)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return "high" if value > 3 else "low" if value < 3 else None


def dimension_accuracy(measured: dict[str, float | None], target: dict[str, float | str] | None) -> dict[str, Any]:
    """InCharacter dimension accuracy: the share of targeted domains whose measured side matches, Wilson interval.

    A measured mean of exactly 3 sides with neither label, so it is a miss; a numeric target of exactly 3 names no
    side and is not counted; a domain the administration could not measure is left out (and counted as unmeasured).
    """
    domains: dict[str, dict[str, Any]] = {}
    unmeasured = 0
    for d in ipip.DOMAINS:
        want = target_side((target or {}).get(d))
        if want is None:
            continue
        mean = measured.get(d)
        if mean is None:
            unmeasured += 1
            continue
        got = "high" if mean > 3 else "low" if mean < 3 else "middle"
        domains[d] = {"target": want, "measured": round(mean, 3), "match": got == want}
    hits = sum(1 for v in domains.values() if v["match"])
    return rate_ci(hits, len(domains)).as_dict() | {"hits": hits, "unmeasured": unmeasured, "domains": domains}


_TARGET_TOKENS = 600


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
                values = stage_names(project, stage) | {"statement": ipip.statement(item, project.language),
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
        tasks.append(Task("target", "", stage, "target", stage_names(project, stage) | {"material": material},
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


@dataclass(frozen=True)
class BigFiveResult:
    """Per model and stage: the IPIP-NEO-120 profile, distances to targets, stages and peers; or why none was run."""

    reason: str = ""  # why the scale was not administered ("" when it was)
    stages: list[str] = field(default_factory=list)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    interview_items: int = 0

    def to_json(self) -> dict[str, Any]:
        """report.json's "ipip" section."""
        if self.reason:
            return {"enabled": False, "reason": self.reason}
        return {"enabled": True, "inventory": "IPIP-NEO-120", "stages": self.stages, "method": METHOD,
                "targets": self.targets, "models": self.models, "interview_items": self.interview_items}


def result(project: Project, runs: dict[str, ModelRun], plan: Plan, verdicts: dict[str, Any],
           peers: Sequence[Persona]) -> BigFiveResult:
    """The Big Five section: each model's profiles, compared with the targets, across stages and with peers."""
    if not plan.ipip_stages:
        return BigFiveResult("eval.ipip is off")
    # Numeric domains go into the profile (distances); "high"/"low" labels only into dimension accuracy.
    targets: dict[str, dict[str, Any]] = {
        s: {"profile": {d: float(v) for d, v in p.items() if not isinstance(v, str)},
            "labels": {d: v for d, v in p.items() if isinstance(v, str)}, "source": "persona.yaml (eval.target)"}
        for s, p in project.eval.target.items() if s in plan.ipip_stages}
    for stage, derived in targets_from(verdicts.get("target", [])).items():
        targets[stage] = derived | {"source": f"estimated by the teacher ({derived['repeats']} parsed repeat(s))"}
    interviews = interview_scores(verdicts.get("ipip", []))
    models = {}
    for name, run in runs.items():
        stages = {s: ipip_summary(run.ipip[f"{project.slug}/{s}"], interviews.get((name, s)), project.language)
                  for s in plan.ipip_stages}
        peer_profiles = {key.split("/")[0]: ipip_summary(admin, None, project.language)
                         for key, admin in run.ipip.items() if not key.startswith(f"{project.slug}/")}
        models[name] = {
            "stages": stages, "peers": peer_profiles,
            "target_distance": {s: _distance(stages[s]["domain_mean"], (targets.get(s) or {}).get("profile"))
                                for s in stages},
            "dimension_accuracy": {s: dimension_accuracy(stages[s]["domain_mean"], _sides(targets.get(s)))
                                   for s in stages if targets.get(s)},
            "stage_distance": {f"{a} vs {b}": _distance(stages[a]["domain_mean"], stages[b]["domain_mean"])
                               for i, a in enumerate(stages) for b in list(stages)[i + 1:]},
            "persona_distance": {slug: _distance(stages[plan.ipip_stages[-1]]["domain_mean"], p["domain_mean"])
                                 for slug, p in peer_profiles.items()},
            "interview_distance": {s: _distance(v["interview"]["domain_mean"], v["domain_mean"])
                                   for s, v in stages.items() if "interview" in v},
        }
    return BigFiveResult("", list(plan.ipip_stages), targets, models, len(plan.interview))


def _sides(target: dict[str, Any] | None) -> dict[str, float | str]:
    """A stage target's numeric domains and labels together (what dimension accuracy compares against)."""
    return {**((target or {}).get("profile") or {}), **((target or {}).get("labels") or {})}


def _distance(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b:
        return None
    d = ipip.distance(a, b)
    return None if d is None else round(d, 3)


def score(inputs: Inputs) -> BigFiveResult:
    """Every model's Big Five profiles against the targets."""
    return result(inputs.project, inputs.runs, inputs.plan, inputs.verdicts, inputs.peers)


def summary(report: dict[str, Any], model: str) -> list[list[str]]:
    """The terminal row: domain means per stage with the target distance and dimension accuracy."""
    return [[model, "Big Five", summary_line(report, model)]]


def summary_line(report: dict[str, Any], model: str) -> str:
    section = report["ipip"]
    if not section.get("enabled"):
        return "not run"
    entry = section["models"][model]
    parts = []
    for stage, scores in entry["stages"].items():
        if all(scores["domain_mean"][d] is None for d in ipip.DOMAINS):
            parts.append(f"{stage}: no answer could be read ({scores['missing']} missing)")
            continue
        means = " ".join(f"{d}{num(scores['domain_mean'][d], 1)}" for d in ipip.DOMAINS)
        distance = entry["target_distance"].get(stage)
        accuracy = (entry.get("dimension_accuracy") or {}).get(stage) or {}
        notes = ([f"target d={distance:.2f}"] if distance is not None else []) + (
            [f"dimension accuracy {accuracy['hits']}/{accuracy['n']}"] if accuracy.get("n") else [])
        parts.append(f"{stage}: {means}" + (f" ({', '.join(notes)})" if notes else ""))
    return "; ".join(parts)


def html(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    """The Big Five section: profiles per stage as radar charts, scores, targets, distances, facets."""
    b = r["ipip"]
    if not b.get("enabled"):
        return f"<p class='note'>{escape(b.get('reason', 'disabled'))}</p>"
    parts = [f"<p class='note'>{escape(b['method'])}</p>", "<div class='charts'>"]
    axes = [ipip.DOMAIN_NAMES[d] for d in ipip.DOMAINS]
    for stage in b["stages"]:
        series = {m: [b["models"][m]["stages"][stage]["domain_mean"][d] for d in ipip.DOMAINS] for m in models
                  if stage in b["models"][m]["stages"]}
        target = (b["targets"].get(stage) or {}).get("profile")
        if target:
            series["target"] = [target.get(d) for d in ipip.DOMAINS]
        parts.append(charts.radar_chart(f"Big Five at {stage} (1-5)", axes, series, palette, dashed=["target"]))
    parts.append("</div>")
    rows = []
    for m in models:
        for stage, s in b["models"][m]["stages"].items():
            sums = s.get("domain_sum") or {}
            rows.append([m, stage, s["method"]] + [f"{sums.get(d, 'n/a')} / {s['domain_mean'][d]:.2f}"
                                                   if s["domain_mean"][d] is not None else "n/a"
                                                   for d in ipip.DOMAINS]
                        + [b["models"][m]["target_distance"].get(stage),
                           _accuracy_cell(b["models"][m].get("dimension_accuracy", {}).get(stage)),
                           _counts(s.get("raw_option_counts"))])
    parts.append(table_html(["model", "stage", "method"] + [f"{d} sum / mean" for d in ipip.DOMAINS]
                        + ["distance to target", "dimension accuracy", "uncalibrated answers 1-5"], rows))
    parts.append(_targets(b))
    parts.append(_distances(b, models))
    parts.append(_facets(b, models))
    return "".join(parts)


def _accuracy_cell(acc: dict[str, Any] | None) -> str:
    """Dimension accuracy as 'hits/n (rate [low, high])', or n/a without a labelled or numeric target."""
    if not acc or not acc.get("n"):
        return "n/a"
    return f"{acc['hits']}/{acc['n']} ({fmt(acc)})"


def _counts(counts: dict[str, int] | None) -> str:
    return " ".join(f"{k}:{v}" for k, v in counts.items()) if counts else "-"


def _targets(b: dict[str, Any]) -> str:
    rows = [[stage, t.get("source", ""), *((t.get("profile") or {}).get(d, (t.get("labels") or {}).get(d))
                                            for d in ipip.DOMAINS)]
            for stage, t in b["targets"].items()]
    return "<h3>Target profiles</h3>" + table_html(["stage", "source", *ipip.DOMAINS], rows)


def _distances(b: dict[str, Any], models: list[str]) -> str:
    rows = []
    for m in models:
        entry = b["models"][m]
        rows += [[m, "between stages", k, v] for k, v in entry["stage_distance"].items()]
        rows += [[m, "to other persona", k, v] for k, v in entry["persona_distance"].items()]
        rows += [[m, "interview vs choice", k, v] for k, v in entry.get("interview_distance", {}).items()]
    if not rows:
        return ""
    return ("<h3>Profile distances (Euclidean over domain means)</h3>"
            + table_html(["model", "between", "which", "distance"], rows))


def _facets(b: dict[str, Any], models: list[str]) -> str:
    header = ["facet"] + [f"{m}/{s}" for m in models for s in b["models"][m]["stages"]]
    rows = []
    for d in ipip.DOMAINS:
        for f, name in enumerate(ipip.FACET_NAMES[d], 1):
            key = f"{d}{f}"
            row: list[Any] = [f"{key} {name}"]
            for m in models:
                for s in b["models"][m]["stages"].values():
                    sums = s.get("facet_sum")
                    row.append(sums[key] if sums else s["facet_mean"][key])
            rows.append(row)
    return "<details><summary>Facet scores (sums 4-20)</summary>" + table_html(header, rows) + "</details>"


CRITERION = Criterion("ipip", "big-five", "Psychological scale (IPIP-NEO-120)", score, summary, html)
