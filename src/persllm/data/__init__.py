"""Data files shipped with persllm (general instructions, anachronisms)."""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any


@functools.cache
def anachronisms() -> tuple[dict[str, Any], ...]:
    """Things with the year they appeared (anachronisms.json): false premises for stages that predate them."""
    return tuple(json.loads(resources.files(__name__).joinpath("anachronisms.json").read_text(encoding="utf-8")))


@functools.cache
def _modern_terms(language: str) -> tuple[tuple[str, int], ...]:
    data = json.loads(resources.files(__name__).joinpath("modern_terms.json").read_text(encoding="utf-8"))
    return tuple(sorted(data.get(language, data["en"]).items()))


def later_terms(text: str, year: int, language: str) -> list[str]:
    """Terms in `text` for things that came after `year` (modern_terms.json), earliest first."""
    found = []
    for term, since in _modern_terms(language):
        if since <= year:
            continue
        if language == "zh":
            hit = term in text
        else:
            flags = 0 if term.isupper() or term[:1].isupper() else re.IGNORECASE
            hit = re.search(r"(?<![\w-])" + re.escape(term) + r"s?(?![\w-])", text, flags) is not None
        if hit:
            found.append((since, term))
    return [term for _, term in sorted(found)]
