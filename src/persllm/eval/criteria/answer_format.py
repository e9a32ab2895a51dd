"""Answer format: the share of greedy answers that leave the trained format (no stop, analysis shown)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from persllm import template
from persllm.eval.criteria.base import Criterion, Inputs
from persllm.eval.generate import Answer
from persllm.eval.metrics import rate_ci
from persllm.eval.render import bars_html, ci, pct, table_html
from persllm.prompts import load_prompts

# Openings of an analysis (persllm's own and the teacher prompts'): a visible answer starting so is analysis text.
_ANALYSIS_OPENINGS = ("no false premise", "false premise", "relevant:", "what {name} knows", "{name} answers",
                      "{name}'s own view", "the user ", "nothing in it is false", "this tries to make", "analysis:")


def analysis_phrases(analysis_templates: dict[str, str], name: str) -> tuple[str, ...]:
    """Literal pieces of persllm's analysis sentences (prompts grounded.analysis) with the persona's name filled in:
    found in a visible answer, they are the analysis leaking into what the user reads."""
    out = []
    for text in analysis_templates.values():
        for piece in re.split(r"\{(?!name\})\w+\}", text.replace("{name}", name)):
            piece = piece.strip(" .。,，").lower()
            if len(piece) >= (6 if re.search(r"[\u4e00-\u9fff]", piece) else 18):
                out.append(piece)
    return tuple(dict.fromkeys(out))


def format_failures(answers: Sequence[Answer], keep_cot: bool, name: str, forced: str = "",
                    phrases: Sequence[str] = ()) -> dict[str, Any]:
    """Share of greedy answers that leave the trained format: no end, analysis shown as the answer, tags out of place.

    Counted per answer (probes and held-out questions): `no_stop` (the token budget ran out), `no_response`
    (CoT format without a [Response]), `analysis_in_answer` (the visible answer opens like an analysis, contains
    one of the analysis `phrases`, or a second [Analysis] follows the response; in the response-only format, any
    tag at all), `empty` (nothing visible).
    """

    openings = tuple(o.format(name=name.lower()) for o in _ANALYSIS_OPENINGS)
    counts = {"no_stop": 0, "no_response": 0, "analysis_in_answer": 0, "empty": 0}
    failed: list[bool] = []
    examples: list[dict[str, Any]] = []
    for answer in answers:
        if answer.error or answer.purpose not in ("probe", "heldout"):
            continue
        problems = []
        if answer.finish == "length":
            problems.append("no_stop")
        raw = answer.text
        if keep_cot and not template.has_response(raw):
            problems.append("no_response")
        visible = answer.visible.strip().lower()
        stray = template.tag_after_response(raw) if keep_cot else template.has_tag(raw)
        if visible.startswith(openings) or any(p in visible for p in phrases) or stray:
            problems.append("analysis_in_answer")
        if not answer.visible.strip():
            problems.append("empty")
        for p in problems:
            counts[p] += 1
        failed.append(bool(problems))
        if problems and len(examples) < 5:
            examples.append({"key": answer.key, "problems": problems, "text": raw[:300]})
    n = len(failed)
    return {"rate": rate_ci(sum(failed), n).as_dict(), "counts": counts, "examples": examples, "forced_prefix": forced,
            "cot_format": keep_cot}


RULE = ("share of greedy answers (probes and held-out questions) that leave the trained format: no end marker within "
        "the budget, no [Response] (CoT format), analysis shown as the answer (a visible answer opening like an "
        "analysis or carrying one of the analysis template's sentences, or another tag after the response), or "
        "nothing visible")


@dataclass(frozen=True)
class FormatResult:
    """Per model: the share of answers off the trained format, counts by problem and examples."""

    models: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """report.json's "format" section."""
        return {"models": self.models, "rule": RULE}


def score(inputs: Inputs) -> FormatResult:
    """Every model's format failures, checked against the analysis template's own sentences."""
    project, plan = inputs.project, inputs.plan
    leaks = analysis_phrases(load_prompts(project.language).get("grounded.analysis"), project.name)
    # A few-shot baseline answers in plain text: [Response] is no part of its format, stopping still is.
    runs = inputs.runs
    return FormatResult({m: format_failures(runs[m].answers, project.sft.keep_cot and not runs[m].prompting,
                                            project.name, plan.decoding.prefix, leaks) for m in inputs.names})


def summary(report: dict[str, Any], model: str) -> list[list[str]]:
    """The terminal row (none in reports made before the format was measured)."""
    found = (report.get("format") or {}).get("models", {}).get(model)
    if not found:
        return []
    counts = ", ".join(f"{k} {v}" for k, v in found["counts"].items() if v)
    return [[model, "off format", f"{pct(found['rate'])} {ci(found['rate'])} of {found['rate']['n']} answers"
             + (f" ({counts})" if counts else "")]]


def html(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    """The format section: the share off format per model, counts by problem, examples."""
    f = r.get("format")
    if not f:
        return "<p class='note'>not measured</p>"
    rows = [[m, f["models"][m]["rate"], *(f["models"][m]["counts"][k] for k in
                                          ("no_stop", "no_response", "analysis_in_answer", "empty"))] for m in models]
    parts = [f"<p class='note'>{escape(f['rule'])}</p>",
             table_html(["model", "answers off the format", "no stop", "no [Response]", "analysis shown", "empty"],
                        rows),
             bars_html("Answers off the trained format (lower)", ["off format"],
                   {m: [f["models"][m]["rate"]] for m in models}, palette, 1.0)]
    for m in models:
        examples = f["models"][m]["examples"]
        if examples:
            items = "".join(f"<li class='fail'>[{escape(', '.join(e['problems']))}] <pre>{escape(e['text'])}</pre></li>"
                            for e in examples)
            parts.append(f"<details><summary>{escape(m)}: examples</summary><ul>{items}</ul></details>")
    return "".join(parts)


CRITERION = Criterion("format", "format", "Answer format", score, summary, html)
