"""Teacher prompts as data: one versioned YAML file per language, filled by name."""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from persllm.errors import ConfigError

LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class Prompts:
    """The prompt set of one language."""

    language: str
    version: str
    data: dict[str, Any]

    def get(self, key: str) -> Any:
        """The raw entry at a dotted key, e.g. 'question.stances.agree'."""
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"prompt {key!r} is missing from the {self.language} prompt file")
            node = node[part]
        return node

    def fill(self, key: str, /, **values: Any) -> str:
        """The prompt at `key` with its {placeholders} filled."""
        return fill(self.get(key), **values)


class _Values(dict):
    """Placeholder values; {Name} is the capitalised form of {name}; unknown placeholders are errors."""

    def __missing__(self, key: str) -> str:
        lower = key[:1].lower() + key[1:]
        if lower != key and lower in self:
            value = str(self[lower])
            if value[1:2].isupper():  # "mRNA vaccines", "iPhone": the lowercase start is part of the name
                return value
            return value[:1].upper() + value[1:]
        raise KeyError(key)


def fill(text: str, /, **values: Any) -> str:
    """Fill {placeholders} in `text`; a missing value raises a KeyError naming it."""
    try:
        return string.Formatter().vformat(text, (), _Values(values))
    except KeyError as exc:
        raise KeyError(f"prompt placeholder {exc.args[0]!r} has no value; text starts {text[:60]!r}") from None


@functools.cache
def load_prompts(language: str) -> Prompts:
    """Load the bundled prompt file for `language` (en or zh)."""
    if language not in LANGUAGES:
        raise ConfigError(f"no prompts for language {language!r}; available: {', '.join(LANGUAGES)}")
    text = resources.files("persllm.prompts").joinpath(f"{language}.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return Prompts(language=language, version=str(data["version"]), data=data)
