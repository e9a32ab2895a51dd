"""Arena results: win rates, a Bradley-Terry ranking with bootstrap confidence intervals, and CSV export."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from persllm.arena.store import Vote
from persllm.csvsafe import csv_text

PRIOR = 0.5  # virtual wins each way per pair: keeps strengths finite when one model won every vote
ELO_BASE, ELO_SCALE = 1000.0, 400.0 / math.log(10)  # ratings on the familiar Elo scale (Chatbot Arena style)


@dataclass(frozen=True)
class Standing:
    """One model's record and Bradley-Terry rating (95% bootstrap interval)."""

    rank: int
    model: str
    games: int
    wins: int
    losses: int
    ties: int
    win_rate: float | None  # (wins + ties / 2) / games
    rating: float
    low: float
    high: float


def bradley_terry(votes: Sequence[Vote], models: Sequence[str], iterations: int = 200) -> dict[str, float]:
    """Elo-scaled Bradley-Terry ratings fitted by minorization-maximization (Hunter 2004); a tie is half a win each."""
    index = {m: i for i, m in enumerate(models)}
    k = len(models)
    wins = [[0.0] * k for _ in range(k)]
    for vote in votes:
        a, b = index.get(vote.left_model), index.get(vote.right_model)
        if a is None or b is None:
            continue
        score = {"left": 1.0, "right": 0.0, "tie": 0.5}[vote.choice]
        wins[a][b] += score
        wins[b][a] += 1.0 - score
    for a, b in itertools.permutations(range(k), 2):
        wins[a][b] += PRIOR
    strength = [1.0] * k
    for _ in range(iterations):
        new = []
        for i in range(k):
            denom = sum((wins[i][j] + wins[j][i]) / (strength[i] + strength[j]) for j in range(k) if j != i)
            new.append(sum(wins[i]) / denom if denom else strength[i])
        mean_log = sum(math.log(s) for s in new) / k
        strength = [s / math.exp(mean_log) for s in new]  # fix the scale: geometric mean 1
    return {m: ELO_BASE + ELO_SCALE * math.log(strength[i]) for m, i in index.items()}


def standings(votes: Sequence[Vote], models: Sequence[str] | None = None, samples: int = 200,
              seed: int = 0) -> list[Standing]:
    """Win rates and ratings, best first; the interval is the 2.5-97.5 percentile over resampled votes."""
    names = sorted(set(models or []) | {m for v in votes for m in (v.left_model, v.right_model)})
    if len(names) < 2:
        return []
    rating = bradley_terry(votes, names)
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(samples if votes else 0):
        fitted = bradley_terry([rng.choice(votes) for _ in votes], names, iterations=100)
        for m in names:
            draws[m].append(fitted[m])
    rows = []
    for model in names:
        mine = [v for v in votes if model in (v.left_model, v.right_model)]
        won = sum(v.winner == model for v in mine)
        tied = sum(v.choice == "tie" for v in mine)
        spread = sorted(draws[model]) or [rating[model]]
        low, high = spread[int(0.025 * (len(spread) - 1))], spread[math.ceil(0.975 * (len(spread) - 1))]
        rate = (won + tied / 2) / len(mine) if mine else None
        rows.append((model, len(mine), won, len(mine) - won - tied, tied, rate, rating[model], low, high))
    rows.sort(key=lambda r: -r[6])
    return [Standing(i + 1, *row) for i, row in enumerate(rows)]


def pairwise(votes: Sequence[Vote]) -> dict[tuple[str, str], tuple[int, int, int]]:
    """For each pair (a, b) with a < b: wins of a, wins of b, ties."""
    table: dict[tuple[str, str], list[int]] = {}
    for vote in votes:
        a, b = sorted((vote.left_model, vote.right_model))
        row = table.setdefault((a, b), [0, 0, 0])
        row[2 if vote.winner is None else 0 if vote.winner == a else 1] += 1
    return {pair: (w[0], w[1], w[2]) for pair, w in sorted(table.items())}


def standings_csv(rows: Sequence[Standing]) -> str:
    """The ranking as CSV."""
    header = ["rank", "model", "games", "wins", "losses", "ties", "win_rate", "rating", "rating_low", "rating_high"]
    return csv_text(header, ([s.rank, s.model, s.games, s.wins, s.losses, s.ties,
                              "" if s.win_rate is None else f"{s.win_rate:.4f}", f"{s.rating:.1f}", f"{s.low:.1f}",
                              f"{s.high:.1f}"] for s in rows))


def votes_csv(votes: Sequence[Vote]) -> str:
    """Every vote as CSV (model A is the answer shown on the left; voter is a pseudonymous cookie id)."""
    header = ["vote_id", "created_utc", "question_id", "stage", "question", "model_a", "model_b", "choice", "winner",
              "comment", "voter"]
    return csv_text(header, ([v.id, datetime.fromtimestamp(v.created, UTC).isoformat(timespec="seconds"),
                              v.question.id, v.question.stage, v.question.question, v.left_model, v.right_model,
                              {"left": "A", "right": "B", "tie": "tie"}[v.choice], v.winner or "tie", v.comment,
                              v.voter or ""] for v in votes))
