"""Interviews (Character-LLM protocol): open questions every model answers in character, scored by the judge.

An interview file (eval.interview, or `persllm eval --interview FILE`) is a JSON list or JSONL file of questions:
each item a string or an object {"question", "topic", "stage", "id"}. A question with a stage is asked at that stage;
one without is asked at every stage, because how the persona answers the same question at different times is part
of what the rubric measures. Each answer is rated 1-7 on five dimensions; the format and rubric are documented in
docs/interviews.md.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm.config import Project
from persllm.errors import DataError
from persllm.eval.probes import file_problems, read_user_file

PURPOSE = "interview_q"  # "interview" is the IPIP open-question administration
DIMENSIONS = ("memorization", "values", "personality", "hallucination", "stability")
SCALE = (1, 7)
FIELDS = ("id", "question", "topic", "stage")
DOCS = "docs/interviews.md"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Question:
    """One interview question and the stages it is asked at."""

    id: str
    question: str
    stages: tuple[str, ...]  # the item's stage, or every stage when the item names none
    topic: str = ""


def interview_path(project: Project) -> Path | None:
    """The interview file eval.interview names (relative to the project root), or None when none is set."""
    return (project.root / project.eval.interview).resolve() if project.eval.interview else None


def load_interview(path: str | Path, stages: Sequence[str]) -> list[Question]:
    """Read and validate an interview file; every problem is reported at once as 'file:line: what is wrong'."""
    path = Path(path)
    text = read_user_file(path, "interview file", "set eval.interview to an existing file (relative to the project "
                          f"directory; format: {DOCS})")
    problems: list[str] = []
    items = _json_list(text, path, problems) if text.lstrip().startswith("[") else _json_lines(text, path, problems)
    questions: list[Question] = []
    first_line: dict[str, int] = {}
    for position, (line, data) in enumerate(items, 1):
        errors = _check(data, stages)
        qid = (data.get("id") if isinstance(data, dict) else None) or f"q{position}"
        if not errors and qid in first_line:
            errors = [(f"id {qid!r} is already used on line {first_line[qid]}; ids must be unique "
                       "(items without an id are numbered q1, q2, ... by position)")]
        if errors:
            problems.extend(f"{path}:{line}: {e}" for e in errors)
            continue
        first_line[qid] = line
        item = {"question": data} if isinstance(data, str) else data
        stage = item.get("stage")
        questions.append(Question(qid, item["question"].strip(), (stage,) if stage else tuple(stages),
                                  (item.get("topic") or "").strip()))
    if problems:
        raise file_problems("interview file", path, problems, DOCS)
    if not questions:
        raise DataError(f"{path}: no questions; write a JSON list of questions or one per line (format: {DOCS})")
    return questions


def _json_lines(text: str, path: Path, problems: list[str]) -> list[tuple[int, Any]]:
    """(line, decoded item) for every non-empty line of a JSONL file."""
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); write one question "
                            "per line, as a JSON string or object")
    return items


def _json_list(text: str, path: Path, problems: list[str]) -> list[tuple[int, Any]]:
    """(line, decoded item) for every element of a JSON list, decoded one by one so each keeps its line number."""
    decoder = json.JSONDecoder()
    items: list[tuple[int, Any]] = []
    index = text.index("[") + 1
    try:
        while True:
            index = _skip_space(text, index)
            if text.startswith("]", index):
                break
            value, end = decoder.raw_decode(text, index)
            items.append((text.count("\n", 0, index) + 1, value))
            index = _skip_space(text, end)
            if text.startswith(",", index):
                index += 1
            elif not text.startswith("]", index):
                raise json.JSONDecodeError("expected ',' or ']'", text, index)
    except json.JSONDecodeError as exc:
        problems.append(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
        return items
    if text[index + 1:].strip():
        problems.append(f"{path}:{text.count(chr(10), 0, index + 1) + 1}: text after the closing ']' of the list")
    return items


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _check(data: Any, stages: Sequence[str]) -> list[str]:
    """Problems with one decoded item (empty when it is a valid question)."""
    if isinstance(data, str):
        return [] if data.strip() else ["empty question; write the question text"]
    if not isinstance(data, dict):
        return [f"expected a question string or a JSON object, got {type(data).__name__}"]
    errors = []
    for key in data:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            errors.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; valid keys: {', '.join(FIELDS)}")
    if not isinstance(data.get("question"), str) or not data["question"].strip():
        errors.append("'question' must be a non-empty string")
    if "topic" in data and not isinstance(data["topic"], str):
        errors.append("'topic' must be a string")
    if "id" in data and not (isinstance(data["id"], str) and _ID.match(data["id"])):
        errors.append(f"id {data['id']!r} must be 1-64 letters, digits, '.', '-' or '_'")
    stage = data.get("stage")
    if stage is not None and stage not in stages:
        errors.append(f"stage {stage!r} is not a stage of this project; use one of: {', '.join(stages)} "
                      "(or leave it out to ask at every stage)")
    return errors
