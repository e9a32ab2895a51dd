"""Teacher jobs with validation retries.

Resume comes from the teacher cache: every response is committed to SQLite as it arrives, and parsing and retry
decisions are deterministic, so a run killed at any point and started again replays finished items for free,
re-asks only the requests that were in flight, and produces exactly the items an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from persllm.backends.base import Backend, Completion, GenParams, Request
from persllm.construct.validate import Reject
from persllm.errors import BackendError
from persllm.progress import NULL, Progress


@dataclass(frozen=True)
class Job:
    """One teacher request whose output must pass `parse` (which raises Reject) to count."""

    key: str
    request: Request
    parse: Callable[[Completion], Any]
    params: GenParams = GenParams()


@dataclass(frozen=True)
class Failed:
    """An item that exhausted its attempts; `reason` is the last rejection or error."""

    reason: str


class Runner:
    """Runs jobs against the teacher in batches, retries rejected outputs with new seeds."""

    def __init__(self, teacher: Backend, attempts: int = 3, progress: Progress = NULL) -> None:
        self.teacher = teacher
        self.attempts = max(1, attempts)
        self.progress = progress
        self.rejected: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()

    def run(self, phase: str, jobs: Sequence[Job]) -> dict[str, Any]:
        """Results by job key: the parsed value, or a Failed."""
        results: dict[str, Any] = {}
        pending = list(jobs)
        if not pending:
            return results
        last_error: dict[str, str] = {}
        with self.progress.task(f"construct: {phase}", total=len(pending)) as task:
            for attempt in range(self.attempts):
                if not pending:
                    break
                pending = self._attempt(phase, pending, attempt, results, last_error, task)
        for job in pending:  # out of attempts
            results[job.key] = Failed(last_error.get(job.key, "unknown"))
        return results

    def _attempt(self, phase: str, jobs: list[Job], attempt: int, results: dict[str, Any],
                 last_error: dict[str, str], task: Any) -> list[Job]:
        """One round over `jobs`; returns those to try again."""
        retry: list[Job] = []
        errors: list[BackendError] = []
        # A new seed per attempt: a rejected output is not simply served again (from the cache or the server).
        requests = [job.request for job in jobs]
        params = [self._params(job, attempt) for job in jobs]
        for index, outcome in self._complete(requests, params):
            job = jobs[index]
            if isinstance(outcome, BackendError):
                errors.append(outcome)
                last_error[job.key] = "backend_error"
                self.rejected["backend_error"] += 1
                retry.append(job)
                continue
            try:
                value = job.parse(outcome)
            except Reject as rej:
                self.rejected[rej.reason] += 1
                last_error[job.key] = rej.reason
                retry.append(job)
                continue
            results[job.key] = value
            self.accepted[phase] += 1
            task.advance()
        if errors and len(errors) == len(jobs) and attempt == 0 and not results:
            raise BackendError(f"every request of '{phase}' failed; first error: {errors[0]}")
        return retry

    def _params(self, job: Job, attempt: int) -> GenParams:
        if attempt == 0:
            return job.params
        base = job.params.seed if job.params.seed is not None else 0
        return dataclasses.replace(job.params, seed=base + 1000 * attempt)

    def _complete(self, requests: list[Request], params: list[GenParams]) -> Any:
        # complete_many takes one GenParams; group by params so each group keeps the backend's concurrency.
        groups: dict[GenParams, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p, []).append(i)
        if len(groups) == 1:
            ((p, idx),) = groups.items()
            yield from ((idx[i], out) for i, out in self.teacher.complete_many([requests[j] for j in idx], p))
            return
        # Different seeds per job: submit them all at once through a thin adapter keeping concurrency.
        yield from _many_params(self.teacher, requests, params)


def _many_params(teacher: Backend, requests: list[Request], params: list[GenParams]) -> Any:
    """Run requests that each have their own params, concurrently where the backend allows it."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    workers = teacher.concurrency
    if workers <= 1:
        for i, (r, p) in enumerate(zip(requests, params)):
            try:
                yield i, teacher.complete(r, p)
            except BackendError as exc:
                yield i, exc
        return
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(teacher.complete, r, p): i for i, (r, p) in enumerate(zip(requests, params))}
        for future in as_completed(futures):
            error = future.exception()
            if error is not None and not isinstance(error, BackendError):
                raise error
            yield futures[future], (error if error is not None else future.result())
