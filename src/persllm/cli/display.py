"""Terminal display for the CLI: rich progress bars, notes, the run summary and its per-stage lines (library code
never prints)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichBars
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

    def __enter__(self) -> Self:
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


def stage_headline(stage: str, stats: dict[str, Any]) -> str:
    """One line of the most useful numbers of a stage, for the run summary."""
    if stage == "ingest":
        return f"{stats.get('passages', 0)} passages ({stats.get('tokens', 0)} tokens)"
    if stage == "construct":
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(stats.get("by_kind", {}).items()))
        rejected = sum(stats.get("rejected", {}).values())
        return (f"{stats.get('samples', 0)} samples ({kinds}); {sum(stats.get('negatives', {}).values())} "
                f"negatives; {rejected} teacher outputs rejected; mode {stats.get('mode')}")
    if stage in ("sft", "dpo"):
        line = f"{stats.get('steps', 0)} steps, loss {_num(stats.get('final_loss'))}"
        if stage == "dpo":
            line += f", {stats.get('pairs', 0)} pairs, reward margin {_num(stats.get('reward_margin'))}"
            acc = stats.get("preference_accuracy")
            if acc:
                line += "; held-out preference accuracy " + " -> ".join(
                    f"{name} {_num(v.get('accuracy'))}" for name, v in acc.items())
        if stats.get("smoke_warning"):
            line += "; SMOKE TEST FAILED (see below)"
        return line
    if stage == "eval":
        from persllm.eval import headline as eval_headline

        return eval_headline(stats)
    return ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, (int, float, str)))[:160]


def smoke_line(stage: str, smoke: dict[str, Any], path: Path | None = None, width: int = 160) -> str:
    """One line on a failed smoke test: the problems, how many answers failed, and an excerpt of one of them."""
    outputs = smoke.get("outputs") or []
    failed = [o for o in outputs if o.get("problems")]
    line = f"{stage} smoke test FAILED: {', '.join(smoke.get('problems') or ['no answers'])}"
    if outputs:
        line += f" ({len(failed)} of {len(outputs)} answers"
        line += f", budget {smoke['max_new_tokens']} new tokens)" if smoke.get("max_new_tokens") else ")"
    if failed:
        example = failed[0]
        text = " ".join(str(example.get("text", "")).split())
        if len(text) > width:
            text = text[: width - 60].rstrip() + " … " + text[-50:].lstrip()
        line += f"; e.g. {example.get('question', '')!r} -> {text!r}"
    if path is not None:
        line += f"; details: {path}"
    return line


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"
