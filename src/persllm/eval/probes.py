"""Probe files (one JSON object per line), their validation, and case-insensitive phrase scoring.

A probe passes when the answer is not garbage (empty, repeating itself, echoing the question or the system prompt,
or a generic assistant reply) and contains at least one `expect_any` phrase (if any are given), every `expect_all`
phrase, one phrase of every `expect_groups` group, no `reject_any` phrase, no year after `reject_years_after` and,
when `only_years` is given, no year outside it (an invented date). Phrases match case-insensitively on whole words for Latin text ('AI' does not match 'said'); in CJK text any
substring matches. The format is documented in docs/probes.md.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm import text as T
from persllm.errors import DataError
from persllm.similarity import normalize
from persllm.types import Probe

FIELDS = ("id", "kind", "stage", "question", "expect_any", "expect_all", "expect_groups", "reject_any",
          "reject_years_after", "only_years", "reference", "meta")
RULES = ("expect_any", "expect_all", "reject_any")  # lists of phrases
# Said by assistants, never by a person in character: an answer containing one of these is garbage for every probe.
GENERIC_ASSISTANT = (
    "as an ai", "as a language model", "as an assistant", "ai language model", "i'm an ai", "i am an ai",
    "i am just an ai", "here to help", "how can i help", "how can i assist", "how may i assist", "happy to help",
    "glad to help", "i don't have personal", "i do not have personal", "i cannot provide", "i can't provide",
    "great question", "i hope this helps", "let me know if", "feel free to", "knowledge cutoff",
    "i'm sorry, but i", "i apologize, but", "virtual assistant", "ai assistant", "openai",
    "作为一个人工智能", "作为人工智能", "作为ai", "作为一个ai", "我是一个ai", "我是ai", "ai助手", "人工智能助手",
    "语言模型", "很高兴为您", "有什么可以帮", "希望这对你有帮助", "希望对您有帮助", "我没有个人", "请随时", "我无法提供")
_ECHO_QUESTION = 0.8  # share of the question's tokens repeated in one run: the answer is the question again
# Tokens in one run shared with the system prompt's instructions (or, longer, with the stage description, which a
# persona may rightly paraphrase): the answer recites its prompt. A CJK token is one character, so CJK runs are longer.
_ECHO_PROMPT = {"instructions": (5, 8), "description": (10, 14)}
_REPEAT_N, _REPEAT_TIMES = 6, 3  # a token 6-gram seen 3 times in one short answer: the model loops
_YEAR = re.compile(r"(?<!\d)(1\d{3}|20\d{2})(?!\d)")
# Markup a person does not speak: HTML tags and the answer format's own tags ("I am anything I <i>not</i>").
_MARKUP = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>|\[/?(?:Analysis|Response)\]", re.IGNORECASE)
_KIND = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_MAX_SHOWN = 20


@dataclass(frozen=True)
class ProbeResult:
    """How one answer fared against one probe's phrase rules."""

    probe_id: str
    passed: bool
    rejected: bool  # a reject_any phrase occurred (for identity probes: the persona broke character)
    reasons: tuple[str, ...] = ()  # why it failed, for the report


def load_probes(path: str | Path, stages: Sequence[str]) -> list[Probe]:
    """Read and validate a probe file; every problem is reported at once as 'file:line: what is wrong'."""
    path = Path(path)
    lines = read_user_file(path, "probe file").splitlines()
    probes: list[Probe] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        errors = _check(data, stages)
        if not errors and data["id"] in first_line:
            errors = [f"id {data['id']!r} is already used on line {first_line[data['id']]}; ids must be unique"]
        if errors:
            problems.extend(f"{path}:{number}: {e}" for e in errors)
            continue
        first_line[data["id"]] = number
        probes.append(probe_from_json(data, stages))
    if problems:
        raise file_problems("probe file", path, problems, "docs/probes.md")
    if not probes:
        raise DataError(f"{path}: no probes; write one JSON object per line (format: docs/probes.md)")
    return probes


def read_user_file(path: Path, what: str, hint: str = "") -> str:
    """The text of a user's UTF-8 file (a BOM is dropped); a missing or undecodable file says so and what to do."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"{what} not found: {path}" + (f"; {hint}" if hint else "")) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start}); save the {what} as UTF-8") from exc


def file_problems(what: str, path: Path, problems: Sequence[str], docs: str) -> DataError:
    """One error listing every 'file:line: problem' of a user file (the first 20, then how many more)."""
    shown = list(problems[:_MAX_SHOWN]) + ([f"... and {len(problems) - _MAX_SHOWN} more"]
                                           if len(problems) > _MAX_SHOWN else [])
    return DataError(f"{len(problems)} problem(s) in {what} {path} (format: {docs}):\n  " + "\n  ".join(shown))


def _check(data: Any, stages: Sequence[str]) -> list[str]:
    """Problems with one decoded line (empty when it is a valid probe)."""
    if not isinstance(data, dict):
        return [f"expected a JSON object, got {type(data).__name__}"]
    errors = []
    for key in data:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            errors.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; valid keys: {', '.join(FIELDS)}")
    for key in ("id", "kind", "question"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            errors.append(f"{key!r} must be a non-empty string")
    if isinstance(data.get("kind"), str) and data["kind"].strip() and not _KIND.match(data["kind"]):
        errors.append(f"kind {data['kind']!r} must be letters, digits, '-' or '_' (e.g. knowledge, temporal)")
    stage = data.get("stage")
    if stage is not None and stage not in stages:
        errors.append(f"stage {stage!r} is not a stage of this project; use one of: {', '.join(stages)}")
    for key in RULES:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            errors.append(f"{key!r} must be a list of non-empty strings")
    groups = data.get("expect_groups", [])
    if not isinstance(groups, list) or not all(
            isinstance(g, list) and g and all(isinstance(v, str) and v.strip() for v in g) for g in groups):
        errors.append("'expect_groups' must be a list of non-empty lists of non-empty strings, e.g. "
                      "[[\"Byron\", \"my father\"], [\"I\", \"my\"]]")
    after = data.get("reject_years_after")
    if after is not None and (isinstance(after, bool) or not isinstance(after, int)):
        errors.append("'reject_years_after' must be a year (an integer), e.g. 1843")
    only = data.get("only_years")
    if only is not None and (not isinstance(only, list)
                             or not all(isinstance(y, int) and not isinstance(y, bool) for y in only)):
        errors.append("'only_years' must be a list of years (integers), e.g. [1833, 1835]")
    if "reference" in data and not isinstance(data["reference"], str):
        errors.append("'reference' must be a string")
    if "meta" in data and not isinstance(data["meta"], dict):
        errors.append("'meta' must be a JSON object")
    if not errors and not any(data.get(k) for k in (*RULES, "expect_groups")) and not data.get("reference"):
        errors.append("no rule: give at least one of expect_any, expect_all, expect_groups, reject_any (or a "
                      "reference to judge)")
    return errors


def probe_from_json(data: dict[str, Any], stages: Sequence[str]) -> Probe:
    """A Probe from a validated JSON object; a missing stage means the latest stage."""
    meta = dict(data.get("meta") or {})
    if data.get("reference"):
        meta["reference"] = data["reference"]
    return Probe(id=data["id"], kind=data["kind"], stage=data.get("stage") or stages[-1], question=data["question"],
                 expect_any=tuple(data.get("expect_any", [])), expect_all=tuple(data.get("expect_all", [])),
                 reject_any=tuple(data.get("reject_any", [])), meta=meta,
                 expect_groups=tuple(tuple(g) for g in data.get("expect_groups", [])),
                 reject_years_after=data.get("reject_years_after"),
                 only_years=None if data.get("only_years") is None else tuple(data["only_years"]))


def probe_to_json(probe: Probe) -> dict[str, Any]:
    """The documented JSONL form of a probe (so probes.jsonl can be edited and fed back with --probes)."""
    meta = {k: v for k, v in probe.meta.items() if k != "reference"}
    out: dict[str, Any] = {"id": probe.id, "kind": probe.kind, "stage": probe.stage, "question": probe.question}
    for key in RULES:
        if getattr(probe, key):
            out[key] = list(getattr(probe, key))
    if probe.expect_groups:
        out["expect_groups"] = [list(g) for g in probe.expect_groups]
    if probe.reject_years_after is not None:
        out["reject_years_after"] = probe.reject_years_after
    if probe.only_years is not None:
        out["only_years"] = list(probe.only_years)
    if probe.meta.get("reference"):
        out["reference"] = probe.meta["reference"]
    if meta:
        out["meta"] = meta
    return out


def _matched(text: str) -> str:
    """What phrases are matched against (and echoes measured on): case-folded, straight apostrophes, single spaces."""
    return normalize(text, case="casefold", straight_quotes=True)


_CJK_RANGES = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD_NOT_CJK = f"[^\\W{_CJK_RANGES}]"  # letters and digits of alphabetic scripts (CJK text has no word spaces)


def _is_word_char(ch: str) -> bool:
    return re.match(_WORD_NOT_CJK, ch) is not None


def contains(text: str, phrase: str) -> bool:
    """True if `phrase` occurs in `text` (case-insensitive; whole words at the edges of alphabetic words)."""
    needle = _matched(phrase)
    if not needle:
        return False
    left = f"(?<!{_WORD_NOT_CJK})" if _is_word_char(needle[0]) else ""
    right = f"(?!{_WORD_NOT_CJK})" if _is_word_char(needle[-1]) else ""
    return re.search(left + re.escape(needle) + right, _matched(text)) is not None


def score_probe(probe: Probe, answer: str, system_prompt: str = "", description: str = "") -> ProbeResult:
    """Apply a probe's rules to the visible answer; garbage (see `garbage`) fails every probe."""
    reasons = list(garbage(answer, probe.question, system_prompt, description))
    if probe.expect_any and not any(contains(answer, p) for p in probe.expect_any):
        reasons.append("none of: " + _shown(probe.expect_any))
    missing = [p for p in probe.expect_all if not contains(answer, p)]
    if missing:
        reasons.append("missing: " + ", ".join(repr(p) for p in missing))
    for group in probe.expect_groups:
        if not any(contains(answer, p) for p in group):
            reasons.append("none of: " + _shown(group))
    hits = [p for p in probe.reject_any if contains(answer, p)]
    if hits:
        reasons.append("contains rejected: " + ", ".join(repr(p) for p in hits))
    asked = set(_YEAR.findall(probe.question))  # "the 1911 Revolution" named back is no later knowledge
    if probe.reject_years_after is not None:
        later = [y for y in _YEAR.findall(answer) if int(y) > probe.reject_years_after and y not in asked]
        if later:
            reasons.append(f"mentions {', '.join(dict.fromkeys(later))}, after {probe.reject_years_after}")
    if probe.only_years is not None:  # a date the source does not give is an invented fact, however fluent
        allowed = asked | {str(y) for y in probe.only_years}
        other = [y for y in _YEAR.findall(answer) if y not in allowed]
        if other:
            reasons.append(f"names {', '.join(dict.fromkeys(other))}, a year its source does not give")
    return ProbeResult(probe.id, passed=not reasons, rejected=bool(hits), reasons=tuple(reasons))


def garbage(answer: str, question: str, system_prompt: str = "", description: str = "") -> tuple[str, ...]:
    """Why an answer is no answer at all: empty, looping, the question or the prompt echoed, or assistant talk.

    `description` is the stage description inside `system_prompt`: echoing it takes a longer run than echoing
    the instructions around it.
    """
    words = _words(answer)
    if not words:
        return ("empty answer",)
    reasons = []
    if _repeats(answer, words):
        reasons.append("repeats itself")
    asked = _words(question)
    if len(asked) >= 4 and _longest_run(words, asked) >= _ECHO_QUESTION * len(asked):
        reasons.append("echoes the question")
    cjk = int(sum(map(_is_cjk_token, words)) > len(words) / 2)
    parts = {"instructions": system_prompt.replace(description, " | ") if description else system_prompt,
             "description": description}
    if any(text and _longest_run(words, _words(text)) >= _ECHO_PROMPT[part][cjk] for part, text in parts.items()):
        reasons.append("echoes the system prompt")
    markup = [m.group(0) for m in _MARKUP.finditer(answer) if m.group(0) not in question]
    if markup:
        reasons.append("markup in the answer: " + ", ".join(repr(m) for m in dict.fromkeys(markup[:3])))
    # A phrase the question itself uses ("you are an AI language model, aren't you?") may be denied in the answer.
    generic = [p for p in GENERIC_ASSISTANT if contains(answer, p) and not contains(question, p)]
    if generic:
        reasons.append("generic assistant answer: " + ", ".join(repr(p) for p in generic[:3]))
    return tuple(reasons)


def _words(text: str) -> list[str]:
    """Normalised tokens without punctuation (what echo and repetition are measured on)."""
    return [t for t in T.tokens(_matched(text)) if re.search(r"\w", t) or t == "|"]


def _is_cjk_token(token: str) -> bool:
    return bool(re.match(f"[{_CJK_RANGES}]", token))


def _repeats(answer: str, words: Sequence[str]) -> bool:
    """A sentence said twice, or a short token sequence looping."""
    said = [" ".join(_words(s)) for s in T.sentences(answer)]
    said = [s for s in said if len(s.split()) >= 3 or (s and _is_cjk_token(s[0]) and len(s) >= 4)]
    if len(said) != len(set(said)):
        return True
    grams = Counter(tuple(words[i:i + _REPEAT_N]) for i in range(len(words) - _REPEAT_N + 1))
    return max(grams.values(), default=0) >= _REPEAT_TIMES


def _longest_run(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest token sequence found in both (contiguous)."""
    best, previous = 0, [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def _shown(phrases: Sequence[str]) -> str:
    return ", ".join(repr(p) for p in phrases[:8]) + (" ..." if len(phrases) > 8 else "")
