"""Scores per criterion, computed from the answers and verdicts every model produced (plain dicts for the report)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any

from persllm.eval import ipip
from persllm.eval.generate import Answer
from persllm.eval.judge import Outcome
from persllm.eval.metrics import cosine, mean_ci, paired, rate_ci, rouge_l, symmetric_bleu
from persllm.eval.probes import score_probe
from persllm.types import Probe, Sample

Embed = Callable[[list[str]], list[list[float]]]


def by_key(answers: Sequence[Answer]) -> dict[str, Answer]:
    """Answers of one model indexed by ask key, leaving out failed generations."""
    return {a.key: a for a in answers if not a.error}


def distinction(answers: Sequence[Answer], heldout: Sequence[Sample], peer_slugs: Sequence[str],
                embed: Embed | None = None) -> dict[str, Any]:
    """The paper's intra (same stage, two samples), stage (other stage) and inter (other personas) BLEU, per stage."""
    index = by_key(answers)
    pairs: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for s in heldout:
        first, second = index.get(f"sample/{s.id}/{s.stage}/1"), index.get(f"sample/{s.id}/{s.stage}/2")
        if first is None:
            continue
        slot = pairs.setdefault(s.stage, {"intra": [], "stage": [], "inter": []})
        if second is not None:
            slot["intra"].append((first.visible, second.visible))
        slot["stage"] += [(first.visible, a.visible) for k, a in index.items()
                          if k.startswith(f"other_stage/{s.id}/")]
        slot["inter"] += [(first.visible, index[f"peer/{s.id}/{p}"].visible) for p in peer_slugs
                          if f"peer/{s.id}/{p}" in index]
    out = {"bleu": _summarise(pairs, symmetric_bleu, (0.0, 100.0))}
    if embed is not None:
        texts = sorted({t for slot in pairs.values() for ps in slot.values() for pair in ps for t in pair})
        vectors = dict(zip(texts, embed(texts))) if texts else {}
        out["embedding"] = _summarise(pairs, lambda a, b: cosine(vectors[a], vectors[b]), (-1.0, 1.0))
    return out


def _summarise(pairs: dict[str, dict[str, list[tuple[str, str]]]], measure: Callable[[str, str], float],
               bounds: tuple[float, float]) -> dict[str, Any]:
    scores = {stage: {k: [measure(a, b) for a, b in ps] for k, ps in slot.items()} for stage, slot in pairs.items()}
    by_stage = {stage: {k: mean_ci(values, bounds).as_dict() for k, values in slot.items()}
                for stage, slot in scores.items()}
    overall = {k: mean_ci([v for slot in scores.values() for v in slot[k]], bounds).as_dict()
               for k in ("intra", "stage", "inter")}
    return {"by_stage": by_stage, "overall": overall}


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


def anti_induction(scores: dict[str, Any]) -> dict[str, Any]:
    """The boundary rates, read off the probe results of one model (TimeChara's temporal types included)."""
    by_kind = scores["by_kind"]
    return {"corrected_false_premises": by_kind.get("induction"),
            "cannot_know_after_stage": by_kind.get("future") or by_kind.get("temporal"),
            "not_there_long_before": by_kind.get("past_absence"),
            "recalls_own_past": by_kind.get("past_presence"),
            "earlier_stage_kept": by_kind.get("past_only"),
            "identity_break": scores["rejected_by_kind"].get("identity")}


def paired_probes(scores: dict[str, dict[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    """Every pair of models on the probes both answered: difference of pass rates (interval) and McNemar's p."""
    out = []
    for a, b in itertools.combinations(models, 2):
        ra, rb = scores[a]["results"], scores[b]["results"]
        shared = [k for k in ra if k in rb]
        test = paired([ra[k] for k in shared], [rb[k] for k in shared])
        out.append({"a": a, "b": b, **test.as_dict()})
    return out


# Openings of an analysis (persllm's own and the teacher prompts'): a visible answer starting so is analysis text.
_ANALYSIS_OPENINGS = ("no false premise", "false premise", "relevant:", "what {name} knows", "{name} answers",
                      "{name}'s own view", "the user ", "nothing in it is false", "this tries to make", "analysis:")


def analysis_phrases(analysis_templates: dict[str, str], name: str) -> tuple[str, ...]:
    """Literal pieces of persllm's analysis sentences (prompts grounded.analysis) with the persona's name filled in:
    found in a visible answer, they are the analysis leaking into what the user reads."""
    out = []
    for text in analysis_templates.values():
        for piece in re.split(r"\{(?!name\})\w+\}", text.replace("{name}", name)):
            piece = piece.strip(" .。,，").lower()
            if len(piece) >= (6 if re.search(r"[\u4e00-\u9fff]", piece) else 18):
                out.append(piece)
    return tuple(dict.fromkeys(out))


def format_failures(answers: Sequence[Answer], keep_cot: bool, name: str, forced: str = "",
                    phrases: Sequence[str] = ()) -> dict[str, Any]:
    """Share of greedy answers that leave the trained format: no end, analysis shown as the answer, tags out of place.

    Counted per answer (probes and held-out questions): `no_stop` (the token budget ran out), `no_response`
    (CoT format without a [Response]), `analysis_in_answer` (the visible answer opens like an analysis, contains
    one of the analysis `phrases`, or a second [Analysis] follows the response; in the response-only format, any
    tag at all), `empty` (nothing visible).
    """
    from persllm import template

    openings = tuple(o.format(name=name.lower()) for o in _ANALYSIS_OPENINGS)
    counts = {"no_stop": 0, "no_response": 0, "analysis_in_answer": 0, "empty": 0}
    failed, examples = [], []
    for answer in answers:
        if answer.error or answer.purpose not in ("probe", "heldout"):
            continue
        problems = []
        if answer.finish == "length":
            problems.append("no_stop")
        raw = answer.text
        if keep_cot and not template.has_response(raw):
            problems.append("no_response")
        visible = answer.visible.strip().lower()
        stray = template.tag_after_response(raw) if keep_cot else template.has_tag(raw)
        if visible.startswith(openings) or any(p in visible for p in phrases) or stray:
            problems.append("analysis_in_answer")
        if not answer.visible.strip():
            problems.append("empty")
        for p in problems:
            counts[p] += 1
        failed.append(bool(problems))
        if problems and len(examples) < 5:
            examples.append({"key": answer.key, "problems": problems, "text": raw[:300]})
    n = len(failed)
    return {"rate": rate_ci(sum(failed), n).as_dict(), "counts": counts, "examples": examples, "forced_prefix": forced,
            "cot_format": keep_cot}


def rouge(answers: Sequence[Answer], heldout: Sequence[Sample]) -> dict[str, Any]:
    """ROUGE-L F of the greedy answer against the golden response, per stage and overall."""
    index = by_key(answers)
    values: dict[str, list[float]] = {}
    for s in heldout:
        answer = index.get(f"heldout/{s.id}")
        if answer is not None:
            values.setdefault(s.stage, []).append(rouge_l(answer.visible, s.response))
    return {"overall": mean_ci([v for vs in values.values() for v in vs], (0.0, 1.0)).as_dict(),
            "by_stage": {k: mean_ci(v, (0.0, 1.0)).as_dict() for k, v in values.items()}}


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


def ranking(outcomes: Sequence[Outcome], models: Sequence[str]) -> dict[str, Any]:
    """Pairwise wins with the order swapped: a verdict counts only if both orders agree, else it is a tie."""
    by_item: dict[tuple[str, str, str], dict[str, list[Any]]] = {}
    for outcome in outcomes:
        a, b, order, item = (outcome.task.meta[k] for k in ("a", "b", "order", "item"))
        by_item.setdefault((a, b, item), {})[order] = list(outcome.values)
    pairs = []
    points: dict[str, list[float]] = {m: [] for m in models}
    consistent = []
    for (a, b), group in itertools.groupby(sorted(by_item.items()), key=lambda kv: kv[0][:2]):
        wins = {a: 0, b: 0, "tie": 0, "missing": 0}
        for _, orders in group:
            for ab, ba in zip(orders.get("ab", []), orders.get("ba", [])):
                if ab is None or ba is None:
                    wins["missing"] += 1
                    continue
                first = {"a": a, "b": b}.get(ab, "tie")
                second = {"a": b, "b": a}.get(ba, "tie")  # in the swapped order, A is model b
                winner = first if first == second else "tie"
                consistent.append(first == second)
                wins[winner] += 1
                points[a].append(1.0 if winner == a else 0.5 if winner == "tie" else 0.0)
                points[b].append(1.0 if winner == b else 0.5 if winner == "tie" else 0.0)
        pairs.append({"a": a, "b": b, "a_wins": wins[a], "b_wins": wins[b], "ties": wins["tie"],
                      "missing": wins["missing"]})
    rates = {m: mean_ci(v, (0.0, 1.0)).as_dict() for m, v in points.items()}
    ranked = sorted((m for m in models if rates[m]["mean"] is not None), key=lambda m: -rates[m]["mean"])
    ranks = {m: ranked.index(m) + 1 if m in ranked else None for m in models}  # no verdict, no rank
    return {"pairs": pairs, "models": {m: {"win_rate": rates[m], "rank": ranks[m]} for m in models},
            "position_consistency": rate_ci(sum(consistent), len(consistent)).as_dict()}


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


def _rate(values: Sequence[bool]) -> dict[str, Any]:
    return rate_ci(sum(values), len(values)).as_dict() | {"passed": sum(values)}


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
