"""Data files shipped with persllm (general instructions, anachronisms)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any


@functools.cache
def anachronisms() -> tuple[dict[str, Any], ...]:
    """Things with the year they appeared (anachronisms.json): false premises for stages that predate them."""
    return tuple(json.loads(resources.files(__name__).joinpath("anachronisms.json").read_text(encoding="utf-8")))
