"""Parse teacher output strictly: anything empty, truncated, multi-question or off-format is rejected by reason."""

from __future__ import annotations

import json
import re

from persllm import template
from persllm import text as T
from persllm.backends.base import Completion


class Reject(Exception):
    """Teacher output that must not reach the data; `reason` is counted in the stats."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


_LABEL = re.compile(r"^\s*(?:question|q|opinion|statement|answer|reply|response|问题|回答)\s*[:：]\s*", re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:\d+[.)、]|[-*•])\s+")
_PREAMBLE = re.compile(r"^\s*(?:sure|certainly|of course|here(?:'s| is| are))\b[^\n]*[:：]\s*$", re.IGNORECASE)
_BREAKS_CHARACTER = re.compile(
    r"\b(?:as an ai|an ai (?:language )?model|i am an ai|i'm an ai|language model|openai|chatgpt)\b|"
    r"我是(?:一个)?(?:人工智能|AI|语言模型)|作为(?:一个)?(?:人工智能|AI|语言模型)", re.IGNORECASE)
_QUOTES = "\"'“”‘’「」『』"


def _check_finished(completion: Completion) -> str:
    if completion.finish_reason == "length":
        raise Reject("truncated", "the teacher hit max_tokens")
    text = completion.text.strip()
    if not text:
        raise Reject("empty")
    return text


def parse_question(completion: Completion, kind: str, language: str) -> str:
    """One question or opinion statement, cleaned of labels, numbering and quotes."""
    text = _check_finished(completion)
    lines = [ln for ln in text.splitlines() if ln.strip() and not _PREAMBLE.match(ln)]
    if not lines:
        raise Reject("empty")
    if len(lines) > 1:
        raise Reject("multiple_lines", f"{len(lines)} lines")
    line = _NUMBERING.sub("", _LABEL.sub("", lines[0])).strip().strip(_QUOTES).strip()
    if template.RESPONSE_TAG.lower() in line.lower() or template.ANALYSIS_TAG.lower() in line.lower():
        raise Reject("format", "answer tags in a question")
    marks = line.count("?") + line.count("？")
    if kind != "opinion" and marks == 0:
        raise Reject("not_a_question")
    if marks > (2 if kind == "opinion" else 1):
        raise Reject("multiple_questions", f"{marks} question marks")
    n = T.count_tokens(line)
    if n < 3:
        raise Reject("too_short", f"{n} tokens")
    if n > (90 if kind == "opinion" else 60):
        raise Reject("too_long", f"{n} tokens")
    return line


def parse_answer(completion: Completion) -> tuple[str, str]:
    """(analysis, response) from '[Analysis] ... [Response] ...' or a JSON object with those keys."""
    text = _check_finished(completion)
    parsed = _from_json(text)
    if parsed is None:
        if not re.search(r"\[\s*analysis\s*\]", text, re.IGNORECASE):
            raise Reject("missing_analysis_tag")
        if not re.search(r"\[\s*response\s*\]", text, re.IGNORECASE):
            raise Reject("missing_response_tag")
        parsed = template.split_answer(text)
    analysis, response = (" ".join(part.split()) for part in parsed)
    if not analysis:
        raise Reject("empty_analysis")
    return analysis, _check_response(response)


def parse_response(completion: Completion) -> str:
    """A plain reply (DPO negatives): tags and labels removed, must be non-empty and complete."""
    text = _check_finished(completion)
    _, response = template.split_answer(text)
    response = _LABEL.sub("", " ".join(response.split())).strip().strip(_QUOTES).strip()
    if not response:
        raise Reject("empty")
    if T.count_tokens(response) < 3:
        raise Reject("too_short")
    return response


def _check_response(response: str) -> str:
    if not response:
        raise Reject("empty_response")
    if re.search(r"\[\s*(analysis|response)\s*\]", response, re.IGNORECASE):
        raise Reject("format", "repeated tags in the response")
    if T.count_tokens(response) < 3:
        raise Reject("too_short")
    if _BREAKS_CHARACTER.search(response):
        raise Reject("breaks_character")
    return response


def breaks_character(text: str) -> bool:
    """True when a reply admits to being an AI or a language model."""
    return bool(_BREAKS_CHARACTER.search(text))


def _from_json(text: str) -> tuple[str, str] | None:
    body = text.strip()
    if body.startswith("```"):
        body = re.sub(r"^```(?:json)?\s*|\s*```$", "", body)
    if not body.startswith("{"):
        return None
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise Reject("bad_json", exc.msg) from exc
    if not isinstance(data, dict) or not isinstance(data.get("response"), str):
        raise Reject("bad_json", "no string 'response' field")
    return str(data.get("analysis") or ""), data["response"]
