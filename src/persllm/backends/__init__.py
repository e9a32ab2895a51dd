"""LLM backends: the one extension point. A ModelSpec from persona.yaml becomes a Backend here."""

from __future__ import annotations

from persllm.backends.base import Backend, Completion, GenParams, Request, Result, Usage, with_retries
from persllm.config import ModelSpec

__all__ = ["Backend", "Completion", "GenParams", "Request", "Result", "Usage", "open_backend", "with_retries"]


def open_backend(spec: ModelSpec, *, seed: int = 0, check: bool = True) -> Backend:
    """Build the backend a spec names; `default` is the embedded Gemma 3 270M served by llama.cpp.

    With `check`, HTTP endpoints are contacted once so an unreachable server fails now, with a clear message.
    """
    if spec.backend == "default":
        from persllm.backends.llamacpp import LlamaCpp
        from persllm.models import embedded_chat_gguf

        return LlamaCpp(embedded_chat_gguf(), n_ctx=spec.n_ctx, seed=seed)
    if spec.backend == "openai":
        from persllm.backends.openai_compat import OpenAICompatible

        backend = OpenAICompatible(spec.model, base_url=spec.base_url, api_key_env=spec.api_key_env,
                                   timeout=spec.timeout, max_retries=spec.max_retries, concurrency=spec.concurrency)
        if check:
            backend.check()
        return backend
    if spec.backend == "llamacpp":
        from persllm.backends.llamacpp import LlamaCpp

        return LlamaCpp(spec.model, n_ctx=spec.n_ctx, seed=seed)
    if spec.backend == "hf":
        from persllm.backends.hf import HFBackend

        return HFBackend(spec.model, adapter=spec.adapter or None)
    if spec.backend == "fake":
        from persllm.backends.fake import FakeBackend

        return FakeBackend()
    raise ValueError(f"unknown backend {spec.backend!r}")


def base_model_path(spec: ModelSpec) -> str:
    """Transformers-loadable location of the model to tune (the embedded default is converted once)."""
    if spec.backend == "default":
        from persllm.models import embedded_hf_dir

        return str(embedded_hf_dir())
    return spec.model
