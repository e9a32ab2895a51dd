"""Model ids: which persona, stage and variant each id of /v1/models stands for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from persllm import variants
from persllm.config import Project
from persllm.errors import ConfigError

_RANK = {"dpo": 3, "sft": 2, "base": 1}  # "best variant" order; endpoint specs rank below the persona's own models


@dataclass(frozen=True)
class Served:
    """A project to serve, optionally narrowed to one stage and/or one variant."""

    project: Project
    stage: str | None = None
    variant: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One id of /v1/models: a persona at a stage through one variant."""

    id: str
    project: Project
    stage: str
    variant: str


def model_entries(projects: Sequence[Project | Served]) -> dict[str, ModelEntry]:
    """Every model id the projects offer; unknown stages and missing adapters raise ConfigError now."""
    chosen: dict[tuple[str, str], list[str]] = {}
    owners: dict[str, Project] = {}
    for item in projects:
        sel = item if isinstance(item, Served) else Served(item)
        project = sel.project
        other = owners.setdefault(project.slug, project)
        if other.root != project.root:
            raise ConfigError(f"{other.root} and {project.root} are both persona {project.slug!r}; "
                              "serve one of them, or rename a persona")
        stages = [project.stage(sel.stage).id] if sel.stage else [s.id for s in project.stages]
        names = [sel.variant] if sel.variant else variants.available(project)
        for name in names:
            variants.check_variant(project, name)
        for stage in stages:
            served = chosen.setdefault((project.slug, stage), [])
            served.extend(n for n in names if n not in served)
    entries: dict[str, ModelEntry] = {}
    for (slug, stage), names in chosen.items():
        for name in names:
            entries[f"{slug}@{stage}:{name}"] = ModelEntry(f"{slug}@{stage}:{name}", owners[slug], stage, name)
        best = max(names, key=lambda n: _RANK.get(n, 0))
        entries[f"{slug}@{stage}"] = ModelEntry(f"{slug}@{stage}", owners[slug], stage, best)  # the best variant
    return entries

