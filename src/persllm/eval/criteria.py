"""Scores per criterion, computed from the answers and verdicts every model produced (plain dicts for the report)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from persllm.eval import ipip
from persllm.eval.generate import Answer
from persllm.eval.judge import Outcome
from persllm.eval.metrics import cosine, mean_ci, rate_ci, rouge_l, symmetric_bleu
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


def probe_scores(answers: Sequence[Answer], probes: Sequence[Probe]) -> dict[str, Any]:
    """Pass rates per kind (Wilson intervals), every failing answer, and identity-break counts."""
    index = by_key(answers)
    results: dict[str, list[bool]] = {}
    rejected: dict[str, list[bool]] = {}
    failures, missing = [], 0
    for probe in probes:
        answer = index.get(f"probe/{probe.id}")
        if answer is None:
            missing += 1
            continue
        result = score_probe(probe, answer.visible)
        results.setdefault(probe.kind, []).append(result.passed)
        rejected.setdefault(probe.kind, []).append(result.rejected)
        if not result.passed:
            failures.append({"probe_id": probe.id, "kind": probe.kind, "stage": probe.stage,
                             "question": probe.question, "answer": answer.visible, "reasons": list(result.reasons)})
    flat = [r for rs in results.values() for r in rs]
    return {"overall": _rate(flat), "by_kind": {k: _rate(v) for k, v in sorted(results.items())},
            "rejected_by_kind": {k: _rate(v) for k, v in sorted(rejected.items())},
            "failures": failures, "missing": missing}


def anti_induction(scores: dict[str, Any]) -> dict[str, Any]:
    """The three boundary rates, read off the probe results of one model."""
    return {"corrected_false_premises": scores["by_kind"].get("induction"),
            "cannot_know_after_stage": scores["by_kind"].get("temporal"),
            "identity_break": scores["rejected_by_kind"].get("identity")}


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
