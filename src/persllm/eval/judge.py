"""An LLM judge with cached, repeated, strictly parsed verdicts.

Each repeat goes through its own CachedBackend salt ("repeat-0", "repeat-1", ...), so reruns cost nothing and
repeats are independent samples. A reply that does not match the requested format is asked again (new seed); if it
still fails it is recorded as missing and never turned into a score.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persllm.backends import Backend, GenParams
from persllm.backends.cache import CachedBackend
from persllm.errors import BackendError
from persllm.eval.metrics import Estimate, mean_ci
from persllm.progress import NULL, Progress
from persllm.prompts import Prompts
from persllm.types import Message

Parser = Callable[[str], Any]
# Markdown emphasis around the keyword or value is tolerated; anything else on the line makes it unparseable.
_SCORE = re.compile(r"^[*_#\s]*score[*_\s]*[:：][*_\s]*(\d+)\s*(?:/\s*\d+)?[*_.\s]*$", re.IGNORECASE)
_WINNER = re.compile(r"^[*_#\s]*winner[*_\s]*[:：][*_\s]*(a|b|tie)[*_.\s]*$", re.IGNORECASE)
_TRAIT = re.compile(r"^[*_#\s-]*([OCEAN])[*_\s]*[:：][*_\s]*(\d(?:\.\d+)?)[*_.\s]*$")


def score_parser(low: int, high: int) -> Parser:
    """Exactly one 'Score: N' line with an integer N in [low, high], else None."""
    def parse(text: str) -> int | None:
        found = [int(m.group(1)) for line in text.splitlines() if (m := _SCORE.match(line.strip()))]
        return found[0] if len(found) == 1 and low <= found[0] <= high else None
    return parse


def parse_winner(text: str) -> str | None:
    """Exactly one 'Winner: A|B|tie' line, else None."""
    found = [m.group(1).lower() for line in text.splitlines() if (m := _WINNER.match(line.strip()))]
    return found[0] if len(found) == 1 else None


def parse_profile(text: str) -> dict[str, float] | None:
    """Exactly one 'X: n' line (1-5) for each of O, C, E, A, N, else None."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _TRAIT.match(line.strip())
        if match:
            if match.group(1) in values:
                return None
            values[match.group(1)] = float(match.group(2))
    ok = set(values) == set("OCEAN") and all(1 <= v <= 5 for v in values.values())
    return values if ok else None


@dataclass(frozen=True)
class Task:
    """One thing to judge."""

    criterion: str  # accuracy | pairwise | ipip | target | probe | interview
    model: str  # the model under test the verdict is about ("" for targets)
    item_id: str
    prompt_key: str  # key under judge.* in the prompt files
    values: dict[str, Any]  # placeholders of the prompt
    parser: Parser = field(compare=False, repr=False)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # bookkeeping, e.g. the pair and order


@dataclass(frozen=True)
class Outcome:
    """All repeats of one task: parsed values (None = missing after retries)."""

    task: Task
    values: tuple[Any, ...]

    @property
    def parsed(self) -> list[Any]:
        """The values that parsed."""
        return [v for v in self.values if v is not None]

    def estimate(self) -> Estimate:
        """Mean and interval over the repeats that parsed (numeric tasks)."""
        return mean_ci([float(v) for v in self.parsed])


class Judge:
    """Runs tasks through a backend with caching, repeats, retries and a record of every reply."""

    def __init__(self, backend: Backend, prompts: Prompts, cache_path: Path | None = None, repeats: int = 1,
                 retries: int = 2, max_tokens: int = 96, seed: int = 0, spec: str = "") -> None:
        self.backend = backend
        self.prompts = prompts
        self.repeats = repeats
        self.retries = retries
        self.max_tokens = max_tokens
        self.seed = seed
        self.spec = spec or backend.name
        self._views = [CachedBackend(backend, cache_path, salt=f"repeat-{i}") if cache_path else backend
                       for i in range(repeats)]
        self.records: list[dict[str, Any]] = []

    def params(self, repeat: int, attempt: int) -> GenParams:
        """Greedy for a single first attempt; sampled (seeded) when repeats or retries must differ."""
        temperature = 0.0 if self.repeats == 1 and attempt == 0 else 0.7
        return GenParams(temperature=temperature, max_tokens=self.max_tokens,
                         seed=self.seed + 1000 * attempt + repeat)

    def messages(self, task: Task) -> list[Message]:
        """The judge prompt of a task."""
        return [Message("system", self.prompts.get("judge.system")),
                Message("user", self.prompts.fill(f"judge.{task.prompt_key}", **task.values))]

    def run(self, tasks: Sequence[Task], progress: Progress = NULL, description: str = "judge") -> list[Outcome]:
        """Judge every task `repeats` times; failed parses are retried up to `retries` times, then missing."""
        values: list[list[Any]] = [[None] * self.repeats for _ in tasks]
        with progress.task(f"{description} ({self.spec})", total=len(tasks) * self.repeats) as bar:
            for repeat, view in enumerate(self._views):
                pending = list(range(len(tasks)))
                for attempt in range(self.retries + 1):
                    if not pending:
                        break
                    pending = self._attempt(view, tasks, pending, repeat, attempt, values)
                bar.advance(len(tasks))
        return [Outcome(t, tuple(v)) for t, v in zip(tasks, values)]

    def _attempt(self, view: Backend, tasks: Sequence[Task], pending: list[int], repeat: int, attempt: int,
                 values: list[list[Any]]) -> list[int]:
        params = self.params(repeat, attempt)
        still: list[int] = []
        for sub, result in view.complete_many([self.messages(tasks[i]) for i in pending], params):
            index = pending[sub]
            task = tasks[index]
            raw = "" if isinstance(result, BackendError) else result.text
            reported = "" if isinstance(result, BackendError) else result.model
            value = None if isinstance(result, BackendError) else task.parser(raw)
            status = "error" if isinstance(result, BackendError) else ("ok" if value is not None else "unparseable")
            if value is None:
                still.append(index)
            else:
                values[index][repeat] = value
            self.records.append({"criterion": task.criterion, "model": task.model, "item_id": task.item_id,
                                 "repeat": repeat, "attempt": attempt, "judge": self.spec, "seed": params.seed,
                                 "temperature": params.temperature, "status": status, "value": value,
                                 "reported_model": reported,
                                 "raw": raw[:2000] if raw else str(result)[:500]})
        return sorted(still)

    def reported_models(self) -> list[str]:
        """Distinct model ids the endpoint reported in its replies (empty when it reports none)."""
        return sorted({r["reported_model"] for r in self.records if r.get("reported_model")})

    def describe(self) -> dict[str, Any]:
        """What the report records about the judge: model, prompts, sampling and repeats."""
        rubric = self.prompts.data.get("judge", {}).get("interview_rubric", {})
        keys = ("system", "accuracy", "pairwise", "ipip", "target", "interview",
                *(f"interview_rubric.{d}" for d in rubric))
        reported = self.reported_models()
        return {"model": self.spec, "prompt_version": self.prompts.version, "repeats": self.repeats,
                # One id pins the judge; several mean the endpoint swapped models mid-run (a warning in the report).
                "reported_model": reported[0] if len(reported) == 1 else (reported or None),
                "retries": self.retries, "max_tokens": self.max_tokens,
                "seeds": [self.params(r, 0).seed for r in range(self.repeats)],
                "temperature": self.params(0, 0).temperature,
                "prompts": {k: self.prompts.get(f"judge.{k}") for k in keys}}

    def close(self) -> None:
        """Close the caches (and the backend once)."""
        for view in self._views:
            view.close()


@dataclass(frozen=True)
class Judges:
    """The judge (None when eval.judge_items is 0) and the teacher that estimates Big Five targets (or None)."""

    judge: Judge | None
    teacher: Judge | None
    reason: str  # why there is no judge


UNRELIABLE = ("Judge scores from the embedded 270M model are unreliable: a model that small cannot rate answers. "
              "Set `judge: openai:MODEL` (or any stronger model) in persona.yaml for scores you can trust.")


def verdict_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts of judge replies by status, so unparseable output is visible in the report."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return {"replies": len(records), **counts}
