"""Ingest: material files -> passages (one per paragraph, long ones split with overlap), provenance kept."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator

from persllm import text as T
from persllm.config import IngestConfig, Project
from persllm.errors import DataError
from persllm.types import MaterialKind, Passage

VERSION = "1"


def ingest(project: Project) -> tuple[list[Passage], dict[str, object]]:
    """Read every stage's knowledge and style file into passages; return them with counts for the stats file."""
    passages: list[Passage] = []
    skipped: Counter[str] = Counter()
    for stage in project.stages:
        for kind in ("knowledge", "style"):
            relative = getattr(stage, kind)
            found = list(_read_material(project, stage.id, kind, relative, project.ingest, skipped))
            if not found:
                raise DataError(f"{relative}: no usable paragraph (lines need at least "
                                f"{project.ingest.min_tokens} tokens); add one paragraph per line")
            passages.extend(found)
    passages = _dedupe_ids(passages)
    by = Counter((p.stage, p.kind) for p in passages)
    stats: dict[str, object] = {
        "passages": len(passages),
        "by_stage_kind": {f"{s}/{k}": n for (s, k), n in sorted(by.items())},
        "split_paragraphs": sum(1 for p in passages if p.part > 0),
        "skipped_lines": dict(skipped),
        "tokens": sum(T.count_tokens(p.text) for p in passages),
    }
    return passages, stats


def material_digest(project: Project) -> dict[str, str]:
    """sha256 of every material file, so editing a file re-runs ingest and what depends on it."""
    digests = {}
    for stage in project.stages:
        for kind in ("knowledge", "style"):
            relative = getattr(stage, kind)
            digests[f"{stage.id}/{kind}"] = hashlib.sha256(project.material_file(relative).read_bytes()).hexdigest()
    return digests


def _read_material(project: Project, stage: str, kind: MaterialKind, relative: str, cfg: IngestConfig,
                   skipped: Counter[str]) -> Iterator[Passage]:
    path = project.material_file(relative)  # re-checked: a symlink may have changed since the project was loaded
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{relative} is not valid UTF-8; re-save it as UTF-8") from exc
    for number, raw in enumerate(lines, 1):
        line = T.normalize(T.strip_tag(raw))
        if not line:
            continue
        if T.count_tokens(line) < cfg.min_tokens:
            skipped["too_short"] += 1
            continue
        for part, piece in enumerate(T.split_long(line, cfg.max_tokens, cfg.overlap_tokens)):
            yield Passage(id=passage_id(stage, kind, piece), persona=project.slug, stage=stage, kind=kind,
                          text=piece, source=relative, line=number, part=part)


def passage_id(stage: str, kind: str, text: str) -> str:
    """Stable id from stage, kind and content: moving or adding other lines does not change it."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]
    return f"{stage}-{kind[0]}-{digest}"


def _dedupe_ids(passages: list[Passage]) -> list[Passage]:
    """Identical paragraphs in one file collapse into one passage (the first occurrence keeps provenance)."""
    seen: set[str] = set()
    out = []
    for passage in passages:
        if passage.id in seen:
            continue
        seen.add(passage.id)
        out.append(passage)
    return out
