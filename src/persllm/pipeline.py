"""Stages over a project's output folder: ingest -> construct -> sft -> dpo -> eval.

Each stage computes a fingerprint of everything its result depends on (its settings, the prompts or code version,
and digests of the upstream data files). A stage whose manifest carries the same fingerprint, and whose data files
still have the sha256 the manifest recorded, is skipped; deleting a stage's folder or changing a setting re-runs that
stage, and downstream stages re-run only if its data files changed. A data file changed after its stage finished
stops the run with a message naming it (or, with `on_changed_output: rerun`, redoes the stage). One process at a time
writes to an output folder (`Workspace.lock`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persllm import __version__, dist
from persllm.config import Project, resolved_dict
from persllm.errors import ConfigError, DataError
from persllm.progress import NULL, Progress
from persllm.types import PreferencePair, Sample, to_record
from persllm.workspace import STAGES, UPSTREAM, Workspace, fingerprint, write_jsonl, write_yaml

DISTRIBUTED_STAGES = ("sft", "dpo")  # stages every rank of a multi-process launch runs together


@dataclass
class StageOutcome:
    """What happened to one stage in a run."""

    stage: str
    skipped: bool
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


def run(project: Project, stages: Sequence[str] = STAGES, force: Collection[str] = (),
        progress: Progress = NULL) -> list[StageOutcome]:
    """Run stages in order, skipping those already done with the same inputs (unless named in `force`)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    ws = Workspace.of(project)
    if not dist.is_main_process():  # `accelerate launch`: every rank runs this; rank 0 writes, locks and reports
        dist.quiet_other_ranks(progress)
        return _run_stages(project, stages, force, NULL, ws)
    with ws.lock():  # a second command on this output fails here, before it writes anything
        write_yaml(ws.root / "config.resolved.yaml", resolved_dict(project) | {"persllm_version": __version__})
        return _run_stages(project, stages, force, progress, ws)


def _run_stages(project: Project, stages: Sequence[str], force: Collection[str], progress: Progress,
                ws: Workspace) -> list[StageOutcome]:
    return [run_stage(project, stage, ws, force=stage in force, progress=progress) for stage in STAGES
            if stage in stages]


def run_stage(project: Project, stage: str, ws: Workspace, force: bool = False,
              progress: Progress = NULL) -> StageOutcome:
    """Run one stage unless its outputs are current."""
    if dist.is_distributed() and stage not in DISTRIBUTED_STAGES:
        # Under `accelerate launch`, stages that do not train (teacher calls, evaluation) run on rank 0 alone.
        outcome = _run_stage(project, stage, ws, force, progress) if dist.is_main_process() else None
        dist.barrier()
        return outcome or StageOutcome(stage, skipped=True, stats=_read_stats(ws.stage_dir(stage)))
    return _run_stage(project, stage, ws, force, progress)


def _run_stage(project: Project, stage: str, ws: Workspace, force: bool, progress: Progress) -> StageOutcome:
    spec = STAGE_SPECS[stage]
    collective = dist.is_distributed() and stage in DISTRIBUTED_STAGES  # every rank runs it together
    upstream = ws.upstream_digests(stage, upstream_of(project, stage))
    settings = spec.config(project)  # once: hashing material or loading peers is not free
    fp = fingerprint(stage, spec.version, settings, upstream)
    manifest = ws.manifest(stage)
    if not force and manifest is not None and manifest.fingerprint == fp:
        changed = ws.changed(manifest)
        if not changed:
            progress.note(f"{stage}: up to date, skipped")
            return StageOutcome(stage, skipped=True, stats=_read_stats(ws.stage_dir(stage)))
        what = ws.describe_changes(manifest, changed)
        if project.on_changed_output == "stop":
            raise DataError(f"{what}. Nothing was overwritten. To redo {stage}, replacing the changed file, run "
                            f"again with --set on_changed_output=rerun (or delete {ws.stage_dir(stage)}); otherwise "
                            "restore the file")
        progress.note(f"{stage}: {what}; redoing {stage} (on_changed_output: rerun)")
    if collective:
        dist.barrier()  # every rank has decided to run before rank 0 invalidates the manifest
    if dist.is_main_process():
        ws.invalidate(stage)  # an interrupted re-run must never leave a manifest describing mixed outputs
    started = time.monotonic()
    stats = spec.run(project, ws, progress)
    if dist.is_main_process():
        write_yaml(ws.stage_dir(stage) / "config.yaml", {"stage": stage, "fingerprint": fp, "settings": settings})
        ws.finish(stage, fp, stats)
    if collective:
        dist.barrier()  # the next stage's fingerprint reads this manifest on every rank
    return StageOutcome(stage, skipped=False, seconds=time.monotonic() - started, stats=stats)


SMOKE_STAGES = ("sft", "dpo")


def smoke_failures(outcomes: Sequence[StageOutcome]) -> list[tuple[str, dict[str, Any]]]:
    """(stage, smoke result) of each SFT/DPO stage in a run, done or skipped, whose generation smoke test failed."""
    return [(o.stage, o.stats.get("smoke") or {}) for o in outcomes
            if o.stage in SMOKE_STAGES and o.stats.get("smoke_warning")]


def _read_stats(stage_dir: Path) -> dict[str, Any]:
    import json

    path = stage_dir / "stats.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


# -- ingest ---------------------------------------------------------------------------------------------------------
def _ingest_config(project: Project) -> dict[str, Any]:
    from persllm.ingest import material_digest

    return {"persona": project.name, "ingest": resolved_dict(project.ingest),
            "stages": [[s.id, s.knowledge, s.style] for s in project.stages], "material": material_digest(project)}


def _run_ingest(project: Project, ws: Workspace, progress: Progress) -> dict[str, Any]:
    from persllm.ingest import ingest

    passages, stats = ingest(project)
    write_jsonl(ws.passages_file, (to_record(p) for p in passages))
    return stats


# -- construct ------------------------------------------------------------------------------------------------------
def _construct_config(project: Project) -> dict[str, Any]:
    from persllm.construct import VERSION, resolve_mode
    from persllm.prompts import load_prompts

    teacher = resolved_dict(project.teacher)
    return {"version": VERSION, "mode": resolve_mode(project), "prompts": load_prompts(project.language).version,
            "teacher": {k: teacher[k] for k in ("backend", "model", "base_url")}, "persona": project.name,
            "aliases": project.aliases, "language": project.language, "seed": project.seed,
            "stages": [[s.id, s.label, s.description] for s in project.stages],
            "construct": resolved_dict(project.construct), "general": _general_digest(project)}


def _general_digest(project: Project) -> str:
    """Digest of the general conversations in use: the source (for datasets) and every selected record's id and
    turns. general.size bounds what is hashed; the built-in set and single-turn JSONL keep their earlier digest."""
    from persllm.general import general_config, load_general
    from persllm.types import stable_id

    records, source = load_general(project)
    parts = ([] if source.kind in ("builtin", "jsonl") else
             [f"{source.kind}|{source.name}|{source.split}|{source.size}|{general_config(project).field}"])
    parts += (r.id + r.instruction + r.reference + "".join(m.role + m.content for m in r.messages[2:])
              for r in records)
    return stable_id(*parts)


def _run_construct(project: Project, ws: Workspace, progress: Progress) -> dict[str, Any]:
    from persllm.backends import open_backend
    from persllm.backends.cache import CachedBackend
    from persllm.construct import construct

    passages = ws.passages()
    teacher = CachedBackend(open_backend(project.teacher, seed=project.seed), ws.cache_dir / "teacher.sqlite")
    try:
        result = construct(project, passages, teacher, progress)
    finally:
        teacher.close()
    write_jsonl(ws.samples_file, (to_record(s) for s in result.samples))
    write_jsonl(ws.negatives_file, (to_record(n) for n in result.negatives))
    return result.stats


# -- training -------------------------------------------------------------------------------------------------------
def _prompt_format(project: Project) -> dict[str, Any]:
    """What shapes the training prompts: persona, stages, language, temporal labels, CoT."""
    from persllm import template

    return {"template": template.VERSION, "persona": project.name, "language": project.language, "seed": project.seed,
            "stages": [[s.id, s.label, s.description] for s in project.stages],
            "temporal_labels": project.sft.temporal_labels, "keep_cot": project.sft.keep_cot,
            "base_model": {k: v for k, v in resolved_dict(project.base_model).items() if k in ("backend", "model")}}


def _sft_config(project: Project) -> dict[str, Any]:
    return _prompt_format(project) | {"sft": resolved_dict(project.sft), "general": _general_digest(project)}


def _run_sft(project: Project, ws: Workspace, progress: Progress) -> dict[str, Any]:
    from persllm.general import load_general
    from persllm.train import train_sft

    records, source = load_general(project)
    general = [list(record.messages) for record in records]
    return train_sft(project, ws.samples(), general, ws.stage_dir("sft"), progress, general_source=source)


def _dpo_config(project: Project) -> dict[str, Any]:
    return _prompt_format(project) | {"dpo": resolved_dict(project.dpo), "peers": _peer_digests(project)}


def _peer_projects(project: Project) -> list[Project]:
    from persllm.config import load_project

    return [load_project(project.material_path(peer)) for peer in project.peers]


def _peer_digests(project: Project) -> dict[str, str]:
    """Digests of the peers' constructed data (their questions feed other_persona negatives)."""
    digests = {}
    for peer in _peer_projects(project):
        manifest = Workspace.of(peer).manifest("construct")
        digests[peer.slug] = manifest.digest if manifest else "not constructed"
    return digests


def _run_dpo(project: Project, ws: Workspace, progress: Progress) -> dict[str, Any]:
    from persllm.backends import base_model_path
    from persllm.train import pairs_by_split, preference_accuracy, train_dpo

    samples = ws.samples()
    pairs, pair_stats = build_dpo_pairs(project, ws, samples)
    split = pairs_by_split(pairs, samples)
    out = ws.stage_dir("dpo")
    if dist.is_main_process():
        write_jsonl(ws.pairs_file,
                    (to_record(p) | {"split": name} for name, group in split.items() for p in group))
    stats = train_dpo(project, split.get("train", []), ws.stage_dir("sft"), out, progress)
    held_out = split.get("test", [])
    if held_out and project.sft.method != "full" and dist.is_main_process():
        base = base_model_path(project.base_model)
        with progress.task("held-out preference accuracy (base, sft, dpo)", total=3) as task:
            accuracy = {}
            for name, adapter in (("base", None), ("sft", ws.adapter_dir("sft")), ("dpo", ws.adapter_dir("dpo"))):
                accuracy[name] = preference_accuracy(base, adapter, held_out)
                task.advance()
        stats["preference_accuracy"] = accuracy
    return stats | {"pair_stats": pair_stats}


def build_dpo_pairs(project: Project, ws: Workspace,
                    samples: Sequence[Sample] | None = None) -> tuple[list[PreferencePair], dict[str, Any]]:
    """The DPO pairs (train and test) the dpo stage trains on, built from the constructed data and the peers'."""
    from persllm.train import build_pairs

    samples = ws.samples() if samples is None else samples
    peer_spaces = [Workspace.of(peer) for peer in _peer_projects(project)]
    peer_samples = [s for peer_ws in peer_spaces if peer_ws.manifest("construct") for s in peer_ws.samples()]
    return build_pairs(project, samples, ws.negatives(), peer_samples)


@dataclass(frozen=True)
class StageSpec:
    """How to fingerprint and run one stage."""

    version: str
    config: Callable[[Project], Any]
    run: Callable[[Project, Workspace, Progress], dict[str, Any]]


# -- eval -----------------------------------------------------------------------------------------------------------
def _eval_config(project: Project) -> dict[str, Any]:
    from persllm.eval import fingerprint_config

    return fingerprint_config(project)


def _run_eval(project: Project, ws: Workspace, progress: Progress) -> dict[str, Any]:
    from persllm.eval import evaluate

    return evaluate(project, ws, progress)


def upstream_of(project: Project, stage: str) -> tuple[str, ...]:
    """Stages whose outputs `stage` reads: eval needs only the tuned models it evaluates (base/rag need no training)."""
    from persllm.variants import TUNED

    if stage == "eval":
        return tuple(up for up in UPSTREAM[stage] if up not in TUNED or up in project.eval.models)
    return UPSTREAM[stage]


def stages_for(project: Project, stage: str) -> list[str]:
    """`stage` and every stage it depends on, transitively, in pipeline order."""
    needed, todo = {stage}, [stage]
    while todo:
        for up in upstream_of(project, todo.pop()):
            if up not in needed:
                needed.add(up)
                todo.append(up)
    return [s for s in STAGES if s in needed]


STAGE_SPECS: dict[str, StageSpec] = {
    "ingest": StageSpec("1", _ingest_config, _run_ingest),
    "construct": StageSpec("2", _construct_config, _run_construct),  # 2: second-choice kinds for misfit seeds
    "sft": StageSpec("2", _sft_config, _run_sft),  # 2: turn-marker rows trained, smoke budget from the data
    "dpo": StageSpec("1", _dpo_config, _run_dpo),
    "eval": StageSpec("1", _eval_config, _run_eval),
}
