"""Progress reporting: library code announces tasks and steps; the CLI decides how to draw them."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Self

log = logging.getLogger("persllm")


class Task:
    """One unit of work with an optional total; a context manager that closes itself."""

    def advance(self, n: int = 1) -> None:
        """Count `n` finished steps."""

    def update(self, total: int | None = None, description: str | None = None) -> None:
        """Change the total or the description."""

    def close(self) -> None:
        """The task is over."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Progress:
    """Receives progress from stages. This default only logs; the CLI passes one that draws bars."""

    def task(self, description: str, total: int | None = None) -> Task:
        """Start a task."""
        log.info("%s%s", description, f" ({total})" if total else "")
        return Task()

    def note(self, message: str) -> None:
        """A one-line message for the user (resolved defaults, skipped work)."""
        log.info("%s", message)


NULL = Progress()
