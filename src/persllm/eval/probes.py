"""Probe files (one JSON object per line), their validation, and case-insensitive phrase scoring.

A probe passes when the answer contains at least one `expect_any` phrase (if any are given), every `expect_all`
phrase, and no `reject_any` phrase. Phrases match case-insensitively on whole words for Latin text ('AI' does not
match 'said'); in CJK text any substring matches. The format is documented in docs/probes.md.
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm.errors import DataError
from persllm.types import Probe

FIELDS = ("id", "kind", "stage", "question", "expect_any", "expect_all", "reject_any", "reference", "meta")
RULES = ("expect_any", "expect_all", "reject_any")
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
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"probe file not found: {path}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start}); save the probe file as UTF-8") from exc
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
        shown = problems[:_MAX_SHOWN] + ([f"... and {len(problems) - _MAX_SHOWN} more"] if len(problems) > _MAX_SHOWN
                                         else [])
        raise DataError(f"{len(problems)} problem(s) in probe file {path} (format: docs/probes.md):\n  "
                        + "\n  ".join(shown))
    if not probes:
        raise DataError(f"{path}: no probes; write one JSON object per line (format: docs/probes.md)")
    return probes


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
    if "reference" in data and not isinstance(data["reference"], str):
        errors.append("'reference' must be a string")
    if "meta" in data and not isinstance(data["meta"], dict):
        errors.append("'meta' must be a JSON object")
    if not errors and not any(data.get(k) for k in RULES) and not data.get("reference"):
        errors.append("no rule: give at least one of expect_any, expect_all, reject_any (or a reference to judge)")
    return errors


def probe_from_json(data: dict[str, Any], stages: Sequence[str]) -> Probe:
    """A Probe from a validated JSON object; a missing stage means the latest stage."""
    meta = dict(data.get("meta") or {})
    if data.get("reference"):
        meta["reference"] = data["reference"]
    return Probe(id=data["id"], kind=data["kind"], stage=data.get("stage") or stages[-1], question=data["question"],
                 expect_any=tuple(data.get("expect_any", [])), expect_all=tuple(data.get("expect_all", [])),
                 reject_any=tuple(data.get("reject_any", [])), meta=meta)


def probe_to_json(probe: Probe) -> dict[str, Any]:
    """The documented JSONL form of a probe (so probes.jsonl can be edited and fed back with --probes)."""
    meta = {k: v for k, v in probe.meta.items() if k != "reference"}
    out: dict[str, Any] = {"id": probe.id, "kind": probe.kind, "stage": probe.stage, "question": probe.question}
    for key in RULES:
        if getattr(probe, key):
            out[key] = list(getattr(probe, key))
    if probe.meta.get("reference"):
        out["reference"] = probe.meta["reference"]
    if meta:
        out["meta"] = meta
    return out


def normalize(text: str) -> str:
    """Case-folded NFKC text with straight apostrophes and single spaces (what phrases are matched against)."""
    text = unicodedata.normalize("NFKC", text).replace("’", "'").replace("‘", "'").casefold()
    return re.sub(r"\s+", " ", text).strip()


_CJK_RANGES = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD_NOT_CJK = f"[^\\W{_CJK_RANGES}]"  # letters and digits of alphabetic scripts (CJK text has no word spaces)


def _is_word_char(ch: str) -> bool:
    return re.match(_WORD_NOT_CJK, ch) is not None


def contains(text: str, phrase: str) -> bool:
    """True if `phrase` occurs in `text` (case-insensitive; whole words at the edges of alphabetic words)."""
    needle = normalize(phrase)
    if not needle:
        return False
    left = f"(?<!{_WORD_NOT_CJK})" if _is_word_char(needle[0]) else ""
    right = f"(?!{_WORD_NOT_CJK})" if _is_word_char(needle[-1]) else ""
    return re.search(left + re.escape(needle) + right, normalize(text)) is not None


def score_probe(probe: Probe, answer: str) -> ProbeResult:
    """Apply a probe's phrase rules to the visible answer."""
    reasons = []
    if probe.expect_any and not any(contains(answer, p) for p in probe.expect_any):
        reasons.append("none of: " + ", ".join(repr(p) for p in probe.expect_any[:8])
                       + (" ..." if len(probe.expect_any) > 8 else ""))
    missing = [p for p in probe.expect_all if not contains(answer, p)]
    if missing:
        reasons.append("missing: " + ", ".join(repr(p) for p in missing))
    hits = [p for p in probe.reject_any if contains(answer, p)]
    if hits:
        reasons.append("contains rejected: " + ", ".join(repr(p) for p in hits))
    return ProbeResult(probe.id, passed=not reasons, rejected=bool(hits), reasons=tuple(reasons))
