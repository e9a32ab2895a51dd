"""Shared pieces that show report.json values: numbers and tables for report.html, percentages for the terminal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from persllm.eval import charts


def fmt(value: Any, digits: int = 2) -> str:
    """A number, an estimate dict (mean [low, high] n=..), or n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        if value.get("mean") is None:
            return "n/a" + (f" (n={value['n']})" if value.get("n") else "")
        text = f"{value['mean']:.{digits}f}"
        if value.get("low") is not None:
            text += f" [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"
        return text + f" n={value['n']}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table: a header row, then one row per entry (numbers and estimates right-aligned)."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, (int, float, dict)) or value is None:
        return f"<td class='num'>{escape(fmt(value))}</td>"
    return f"<td>{escape(str(value))}</td>"


def _mean(value: Any) -> float | None:
    return value.get("mean") if isinstance(value, dict) else value


def _interval(value: Any) -> tuple[float, float] | None:
    if isinstance(value, dict) and value.get("low") is not None:
        return value["low"], value["high"]
    return None


def bars_html(title: str, categories: Sequence[str], table: Mapping[str, Sequence[Any]], palette: dict[str, str],
              ymax: float | None = None) -> str:
    """A bar chart of each model's values (estimates drawn with their intervals)."""
    series = {m: [_mean(v) for v in vs] for m, vs in table.items()}
    intervals = {m: [_interval(v) for v in vs] for m, vs in table.items()}
    return charts.bar_chart(title, categories, series, palette, intervals, ymax=ymax)


def pct(value: dict[str, Any] | None) -> str:
    """A rate in percent, "42%", or n/a."""
    if not value or value.get("mean") is None:
        return "n/a"
    return f"{100 * value['mean']:.0f}%"


def num(value: Any, digits: int = 2) -> str:
    """A number or an estimate's mean with `digits` decimals, or n/a."""
    mean = value.get("mean") if isinstance(value, dict) else value
    return "n/a" if mean is None else f"{mean:.{digits}f}"


def ci(value: dict[str, Any] | None) -> str:
    """A rate's 95% interval in percent, '[12%, 40%]'."""
    if not value or value.get("low") is None:
        return ""
    return f"[{100 * value['low']:.0f}%, {100 * value['high']:.0f}%]"
