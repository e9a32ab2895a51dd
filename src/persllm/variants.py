"""Models under test and in chat: 'base' (the prompted base model), 'sft', 'dpo', or any backend spec."""

from __future__ import annotations

from persllm.backends import BACKENDS, Backend, base_model_path, open_backend
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
    if ":" in variant or (variant in BACKENDS and BACKENDS[variant].bare):
        try:
            return parse_model_spec(variant)
        except ValueError as exc:
            raise ConfigError(f"model {variant!r}: {exc}") from exc
    raise ConfigError(f"unknown model {variant!r}; use base, sft, dpo, or a spec such as openai:gpt-4o-mini, "
                      "hf:PATH or llamacpp:FILE.gguf")


def check_variant(project: Project, variant: str) -> None:
    """Raise the usual ConfigError for a missing adapter or an unknown model, without loading anything."""
    if variant in TUNED and variant not in available(project):
        spec_for(project, variant)  # raises "no DPO adapter at ...; run `persllm train` first"
    elif variant != "base" and variant not in TUNED:
        spec_for(project, variant)  # parses endpoint specs; unknown names raise


def backend_key(project: Project, variant: str) -> str:
    """Identity of the weights behind a variant: stages and personas with the same key share one backend."""
    if variant == "base":
        return f"base:{project.base_model.spec}"
    if variant in TUNED:
        return f"{variant}:{project.base_model.spec}+{Workspace.of(project).adapter_dir(variant)}"
    return f"spec:{variant}"


def open_variant(project: Project, variant: str, *, batch_size: int = 8) -> Backend:
    """A backend for a variant (tuned variants load the base model plus their adapter stack), decoding the persona's
    answers as the project says (persllm.decoding); HTTP endpoints are contacted once, so an unreachable server fails
    now."""
    # base, sft and dpo are transformers specs, so a transformers model is always named after its variant.
    backend = open_backend(spec_for(project, variant), seed=project.seed, check=True, batch_size=batch_size,
                           name=variant)
    backend.repetition = project_repetition(project, backend.parameters)
    return backend


def project_repetition(project: Project, parameters: int | None) -> Repetition:
    """The anti-repetition decoding of the persona's answers: the project's `decoding:`, else the size's defaults."""
    return resolve(project.decoding.repetition_penalty, project.decoding.no_repeat_ngram, parameters)
