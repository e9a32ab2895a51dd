"""BACKENDS, the one table of backend kinds: config validation, variants and open_backend all read it.

Adding a backend is one module (the class and its `from_spec`) plus one row here; docs/adding-a-backend.md has the
steps. What a backend can do (concurrency, in process or not, streaming, scoring) is said by the backend itself, as
attributes of the Backend protocol, not here.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from collections.abc import Callable

    from persllm.backends.base import Backend
    from persllm.config import ModelSpec


@dataclass(frozen=True)
class OpenOptions:
    """How to open a backend, beyond its spec (each kind uses what applies to it)."""

    seed: int = 0  # sampling seed of in-process models without a per-request seed
    check: bool = True  # contact an HTTP endpoint once now, so an unreachable server fails with a clear message
    batch_size: int = 8  # prompts per forward pass of a transformers model
    name: str = ""  # what a transformers model is called in reports (its variant, e.g. "sft"); others keep their own


@dataclass(frozen=True)
class BackendKind:
    """One row: the name (the `backend:` value and the spec prefix), how a spec is written, and what opens it."""

    name: str
    form: str  # how a spec of this kind is written, as errors and help show it
    about: str  # what it is, in a few words
    # "module:function" building the backend from (ModelSpec, OpenOptions). Imported on use: config reads this table,
    # and must not import torch, llama.cpp or httpx (nor what they import) to validate a file.
    opener: str
    tunable: bool = False  # may be the base_model that training tunes (a transformers model, or converted to one)

    @property
    def bare(self) -> bool:
        """Written as its name alone ("default", "fake"), with no model after a colon."""
        return ":" not in self.form

    def open(self, spec: ModelSpec, options: OpenOptions) -> Backend:
        """The backend a spec of this kind names."""
        module, _, function = self.opener.partition(":")
        build = cast("Callable[[ModelSpec, OpenOptions], Backend]", getattr(importlib.import_module(module), function))
        return build(spec, options)


BACKENDS: dict[str, BackendKind] = {kind.name: kind for kind in (
    BackendKind("default", "default", "the embedded Gemma 3 270M, served by llama.cpp",
                "persllm.backends.llamacpp:open_embedded", tunable=True),
    BackendKind("openai", "openai:MODEL[@URL]", "any OpenAI-compatible endpoint",
                "persllm.backends.openai_compat:from_spec"),
    BackendKind("llamacpp", "llamacpp:PATH", "a GGUF file, in process", "persllm.backends.llamacpp:from_spec"),
    BackendKind("hf", "hf:MODEL", "a transformers model id or directory, optionally with a PEFT adapter",
                "persllm.backends.hf:from_spec", tunable=True),
    BackendKind("fake", "fake", "scripted replies for tests", "persllm.backends.fake:from_spec"),
)}


def backend_kind(name: str) -> BackendKind:
    """The row of a backend name; an unknown name is a ValueError listing the forms (and the closest name)."""
    kind = BACKENDS.get(name)
    if kind is not None:
        return kind
    close = difflib.get_close_matches(name, list(BACKENDS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown backend {name!r}{hint}; use {spoken([k.form for k in BACKENDS.values()])}")


def spoken(items: list[str]) -> str:
    """'a, b or c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"
