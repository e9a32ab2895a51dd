"""LLM backends: the one extension point. A ModelSpec from persona.yaml becomes a Backend here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from persllm.backends.base import Backend, Completion, GenParams, Request, Result, Usage, with_retries
from persllm.backends.registry import BACKENDS, OpenOptions, backend_kind

if TYPE_CHECKING:  # config reads BACKENDS, so this package must not import config while it loads
    from persllm.config import ModelSpec

__all__ = ["BACKENDS", "Backend", "Completion", "GenParams", "Request", "Result", "Usage", "open_backend",
           "with_retries"]


def open_backend(spec: ModelSpec, *, seed: int = 0, check: bool = True, batch_size: int = 8, name: str = "") -> Backend:
    """Build the backend a spec names (its row of BACKENDS); `default` is the embedded Gemma 3 270M by llama.cpp.

    With `check`, HTTP endpoints are contacted once so an unreachable server fails now, with a clear message;
    `batch_size` and `name` apply to transformers models (see OpenOptions).
    """
    return backend_kind(spec.backend).open(spec, OpenOptions(seed=seed, check=check, batch_size=batch_size, name=name))


def base_model_path(spec: ModelSpec) -> str:
    """Transformers-loadable location of the model to tune (the embedded default is converted once)."""
    if spec.backend == "default":
        from persllm.models import embedded_hf_dir

        return str(embedded_hf_dir())
    return spec.model
