"""Preference accuracy on held-out pairs: does the model find the chosen answer more likely than the rejected one?"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persllm.progress import NULL, Progress
from persllm.train._trainer import end_of_turn
from persllm.types import PreferencePair


def preference_accuracy(base_path: str, adapter: Path | None, pairs: Sequence[PreferencePair],
                        progress: Progress = NULL, batch_size: int = 8) -> dict[str, Any]:
    """Share of pairs whose chosen answer gets the higher per-token (and, separately, summed) log-likelihood.

    Both answers are scored with the end-of-turn marker they were trained with, through HFBackend (which renders
    the prompt with the model's own chat template and loads adapter stacks), so base, SFT and DPO are comparable.
    """
    from persllm.backends.hf import HFBackend
    from persllm.train._model import session

    if not pairs:
        return {"pairs": 0, "accuracy": None, "accuracy_sum": None}
    with session():
        backend = HFBackend(base_path, adapter=adapter, batch_size=batch_size)  # adapter stack merged at load
        scores = _score_pairs(backend, pairs, progress, batch_size)
    return summarize(pairs, scores)


def _score_pairs(backend: Any, pairs: Sequence[PreferencePair], progress: Progress,
                 batch_size: int) -> list[tuple[float, int]]:
    """(sum log-prob, tokens) of chosen then rejected for every pair, in order."""
    try:
        end = end_of_turn(backend.tokenizer)
        requests = [(list(p.prompt), text + end) for p in pairs for text in (p.chosen, p.rejected)]
        scores = []
        with progress.task("scoring preference pairs", total=len(requests)) as task:
            for start in range(0, len(requests), batch_size):
                chunk = requests[start:start + batch_size]
                scores.extend(backend.score(chunk, batch_size=batch_size))
                task.advance(len(chunk))
    finally:
        backend.close()
    return scores


def summarize(pairs: Sequence[PreferencePair], scores: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """Accuracies (ties count as misses), mean margins and per-negative-type accuracy from (sum, tokens) scores."""
    wins_mean = wins_sum = ties = 0
    margins: list[float] = []
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i, pair in enumerate(pairs):
        (chosen_sum, chosen_n), (rejected_sum, rejected_n) = scores[2 * i], scores[2 * i + 1]
        margin = chosen_sum / max(1, chosen_n) - rejected_sum / max(1, rejected_n)
        margins.append(margin)
        win = margin > 0
        wins_mean += win
        wins_sum += chosen_sum > rejected_sum
        ties += margin == 0
        by_type[pair.negative_type][0] += win
        by_type[pair.negative_type][1] += 1
    n = len(pairs)
    return {"pairs": n, "accuracy": round(wins_mean / n, 4), "accuracy_sum": round(wins_sum / n, 4), "ties": ties,
            "mean_margin": round(sum(margins) / n, 4),
            "by_type": {t: {"pairs": total, "accuracy": round(won / total, 4)}
                        for t, (won, total) in sorted(by_type.items())}}

