"""Models under test and in chat: 'base' (the prompted base model), 'sft', 'dpo', or any backend spec."""

from __future__ import annotations

from persllm.backends import Backend, base_model_path, open_backend
from persllm.config import ModelSpec, Project, parse_model_spec
from persllm.decoding import Repetition, resolve
from persllm.errors import ConfigError
from persllm.workspace import Workspace

TUNED = ("sft", "dpo")


def available(project: Project) -> list[str]:
    """Variants that can be loaded now: base always, sft/dpo once trained."""
    ws = Workspace.of(project)
    return ["base"] + [v for v in TUNED if (ws.adapter_dir(v) / "adapter_config.json").is_file()]


def spec_for(project: Project, variant: str) -> ModelSpec:
    """The ModelSpec a variant name stands for; tuned variants need their adapter on disk."""
    if variant == "base":
        return ModelSpec(backend="hf", model=base_model_path(project.base_model))
    if variant in TUNED:
        adapter = Workspace.of(project).adapter_dir(variant)
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(f"no {variant.upper()} adapter at {adapter}; run `persllm train {project.root}` first "
                              f"(available now: {', '.join(available(project))})")
        return ModelSpec(backend="hf", model=base_model_path(project.base_model), adapter=str(adapter))
    if ":" in variant or variant in ("default", "fake"):
        try:
            return parse_model_spec(variant)
        except ValueError as exc:
            raise ConfigError(f"model {variant!r}: {exc}") from exc
    raise ConfigError(f"unknown model {variant!r}; use base, sft, dpo, or a spec such as openai:gpt-4o-mini, "
                      "hf:PATH or llamacpp:FILE.gguf")


def open_variant(project: Project, variant: str, *, batch_size: int = 8) -> Backend:
    """A backend for a variant (tuned variants load the base model plus their adapter stack), decoding the persona's
    answers as the project says (persllm.decoding); HTTP endpoints are contacted once, so an unreachable server fails
    now."""
    spec = spec_for(project, variant)
    backend: Backend
    if variant in ("base", *TUNED) or spec.backend == "hf":
        from persllm.backends.hf import HFBackend

        backend = HFBackend(spec.model, adapter=spec.adapter or None, batch_size=batch_size, name=variant)
    else:
        backend = open_backend(spec, seed=project.seed, check=True)
    backend.repetition = project_repetition(project, getattr(backend, "parameters", None))  # type: ignore[attr-defined]
    return backend


def project_repetition(project: Project, parameters: int | None) -> Repetition:
    """The anti-repetition decoding of the persona's answers: the project's `decoding:`, else the size's defaults."""
    return resolve(project.decoding.repetition_penalty, project.decoding.no_repeat_ngram, parameters)
