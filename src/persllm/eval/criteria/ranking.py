"""Ranking by the judge: pairwise comparisons of the models' answers, asked in both orders."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from persllm.config import Project
from persllm.eval.criteria.base import Criterion, Inputs, by_key, stage_names
from persllm.eval.judge import Outcome, Task, parse_winner
from persllm.eval.metrics import mean_ci, rate_ci
from persllm.eval.render import bars_html, fmt, num, table_html
from persllm.eval.runner import ModelRun
from persllm.types import Sample


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
    means = {m: mean for m in models if (mean := rates[m]["mean"]) is not None}
    ranked = sorted(means, key=lambda m: -means[m])
    ranks = {m: ranked.index(m) + 1 if m in ranked else None for m in models}  # no verdict, no rank
    return {"pairs": pairs, "models": {m: {"win_rate": rates[m], "rank": ranks[m]} for m in models},
            "position_consistency": rate_ci(sum(consistent), len(consistent)).as_dict()}


def pairwise_tasks(project: Project, runs: Sequence[ModelRun], heldout: Sequence[Sample], limit: int) -> list[Task]:
    """Every pair of models on the same held-out items, each comparison asked in both orders."""
    tasks = []
    for left, right in itertools.combinations(runs, 2):
        li, ri = by_key(left.answers), by_key(right.answers)
        items = [s for s in heldout if f"heldout/{s.id}" in li and f"heldout/{s.id}" in ri][:limit]
        for s in items:
            first, second = li[f"heldout/{s.id}"].visible, ri[f"heldout/{s.id}"].visible
            base = stage_names(project, s.stage) | {"question": s.question, "reference": s.response}
            for order, (a, b) in (("ab", (first, second)), ("ba", (second, first))):
                meta = {"a": left.model.name, "b": right.model.name, "order": order, "item": s.id}
                tasks.append(Task("pairwise", f"{left.model.name}|{right.model.name}", f"{s.id}/{order}", "pairwise",
                                  base | {"answer_a": a, "answer_b": b}, parse_winner, meta))
    return tasks


@dataclass(frozen=True)
class RankingResult:
    """Pairwise wins between models (order-swapped), each model's win rate and rank; or why there is no ranking."""

    unavailable: str = ""
    pairs: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    position_consistency: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """report.json's "ranking" section."""
        if self.unavailable:
            return {"unavailable": self.unavailable}
        return {"pairs": self.pairs, "models": self.models, "position_consistency": self.position_consistency}


def score(inputs: Inputs) -> RankingResult:
    """The ranking from the judge's pairwise verdicts (it needs a judge and two models)."""
    if inputs.judges.judge is None:
        return RankingResult(inputs.judges.reason)
    if len(inputs.names) < 2:
        return RankingResult("ranking needs at least two models")
    return RankingResult(**ranking(inputs.verdicts["pairwise"], inputs.names))


def summary(report: dict[str, Any], model: str) -> list[list[str]]:
    """The terminal row: rank and win rate (none without a ranking)."""
    found = report["ranking"]
    if found.get("unavailable"):
        return []
    entry = found["models"][model]
    rank = f"#{entry['rank']}" if entry["rank"] is not None else "unranked (every verdict missing)"
    return [[model, "ranking", f"{rank} (win rate {num(entry['win_rate'])})"]]


def html(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    """The ranking section: ranks, win rates and pairwise wins (both orders asked)."""
    k = r["ranking"]
    if k.get("unavailable"):
        return f"<p class='note'>{escape(k['unavailable'])}</p>"
    rows = [[m, k["models"][m]["rank"], k["models"][m]["win_rate"]] for m in models]
    pairs = [[f"{p['a']} vs {p['b']}", p["a_wins"], p["b_wins"], p["ties"], p["missing"]] for p in k["pairs"]]
    return "".join((("<p class='note'>Each comparison is asked in both orders; a win counts only when "
                    "both orders agree, otherwise it is a tie (position bias control).</p>"),
                    table_html(["model", "rank", "win rate"], rows),
                    table_html(["pair", "first wins", "second wins", "ties", "missing"], pairs),
                    f"<p class='note'>Position consistency: {escape(fmt(k['position_consistency']))}</p>",
                    bars_html("Win rate", ["win rate"], {m: [k["models"][m]["win_rate"]] for m in models}, palette,
                              1.0)))


CRITERION = Criterion("ranking", "ranking", "Ranking by the judge", score, summary, html)
