"""Terminal display for the CLI: rich progress bars, notes and the run summary (library code never prints)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBars, SpinnerColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from persllm.progress import Progress, Task

console = Console(stderr=True)


class _BarTask(Task):
    def __init__(self, bars: RichBars, task_id: Any) -> None:
        self.bars, self.task_id = bars, task_id

    def advance(self, n: int = 1) -> None:
        self.bars.advance(self.task_id, n)

    def update(self, total: int | None = None, description: str | None = None) -> None:
        self.bars.update(self.task_id, total=total, description=description)

    def close(self) -> None:
        task = self.bars.tasks[self.bars.task_ids.index(self.task_id)]
        if task.total is not None:
            self.bars.update(self.task_id, completed=task.total)
        self.bars.stop_task(self.task_id)


class BarProgress(Progress):
    """Progress shown as rich bars; notes printed above them."""

    def __init__(self) -> None:
        self.bars = RichBars(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                             console=console, transient=False)

    def __enter__(self) -> BarProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def task(self, description: str, total: int | None = None) -> Task:
        return _BarTask(self.bars, self.bars.add_task(description, total=total))

    def note(self, message: str) -> None:
        self.bars.console.print(f"[dim]•[/dim] {message}")


def setup_logging(verbose: bool) -> None:
    """Warnings by default, info with -v; third-party chatter stays quiet."""
    if not verbose:  # read when transformers/huggingface_hub are first imported: their own bars and notices
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices meant for library authors
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "accelerate", "peft", "trl"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


def summary_table(title: str, rows: Sequence[Sequence[str]], headers: Sequence[str]) -> Table:
    """A compact table for the final summary."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*row)
    return table
