"""The eval stage: how personified each model is, on the paper's criteria and peers' protocols.

Every model named in eval.models (base, rag, sft, dpo, or an endpoint spec) answers the same questions with the same
template and seeds. From the answers come: BLEU (and embedding) distinction/consistency/development, probe pass
rates, anti-induction and temporal-boundary rates, IPIP-NEO-120 Big Five profiles, judge accuracy and pairwise
ranking against golden answers, ROUGE-L, and held-out perplexity of the persona's own words. Outputs, in
ws.stage_dir("eval"): report.json, report.html, answers.jsonl, verdicts.jsonl and probes.jsonl.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Sequence
from typing import Any

from persllm import template
from persllm.backends import Backend
from persllm.config import Project, resolved_dict
from persllm.decoding import SMALL_MODEL_REPETITION
from persllm.errors import ConfigError, DataError, PersllmError
from persllm.eval import interview as interviews
from persllm.eval import ipip
from persllm.eval.criteria import big_five, precision, probes, ranking
from persllm.eval.criteria import interview as interview_criterion
from persllm.eval.criteria.base import Embed
from persllm.eval.default_probes import default_probes
from persllm.eval.generate import Decoding, FewShot, RagIndex, few_shot_examples, resolve_models
from persllm.eval.judge import Judge, Judges
from persllm.eval.probes import load_probes, probe_to_json
from persllm.eval.report_html import render_html
from persllm.eval.report_json import build_report
from persllm.eval.report_text import headline, stats, summary_rows
from persllm.eval.runner import ModelRun, Opener, Plan, load_peers, run_models
from persllm.progress import NULL, Progress
from persllm.similarity import sentence_model
from persllm.types import Passage, Sample, to_record
from persllm.variants import TUNED, open_variant
from persllm.workspace import Workspace, file_sha256, write_json, write_jsonl, write_text

__all__ = ["evaluate", "fingerprint_config", "headline", "summary_rows"]

def evaluate(project: Project, ws: Workspace, progress: Progress = NULL, *, open_model: Opener | None = None,
             judge: Backend | None = None, teacher: Backend | None = None,
             embed: Embed | None = None) -> dict[str, Any]:
    """Evaluate every model in project.eval.models, write the report files, and return headline stats.

    `open_model`, `judge`, `teacher` and `embed` replace the real backends (tests pass fakes and tiny models).
    """
    started = time.monotonic()
    cfg = project.eval
    for stage, path in (("ingest", ws.passages_file), ("construct", ws.samples_file)):
        if not path.is_file():
            raise DataError(f"eval needs {path}; run `persllm {stage} {project.root}` first")
    models = resolve_models(project, cfg.models)  # a missing adapter or a bad spec fails here, before any work
    samples, passages = ws.samples(), ws.passages()
    plan = _plan(project, samples, passages, _ipip_stages(project))
    opener = open_model or (lambda m: open_variant(project, m.variant, batch_size=cfg.batch_size))
    with contextlib.ExitStack() as stack:
        remote = {}
        for m in models:  # endpoints are contacted now, so an unreachable one fails before any model is loaded
            if not m.local:
                remote[m.name] = opener(m)
                stack.callback(remote[m.name].close)
        judges = _open_judges(project, ws, plan, judge, teacher)
        for j in (judges.judge, judges.teacher):
            if j is not None:
                stack.callback(j.close)
        peers, peer_notes = load_peers(project, cfg.rag_tokens)
        # The rag baseline never retrieves a held-out passage: that would hand it the golden answer's source.
        rag = RagIndex(passages, {s.seed_id for s in samples if s.split == "test"}, cfg.rag_tokens, project.language)
        runs, inter_notes = run_models(project, models, plan, rag, peers, opener, remote, progress)
        judge_started = time.monotonic()
        verdicts = _judge_all(project, judges, runs, plan, passages, progress)
        judge_seconds = time.monotonic() - judge_started
    embed_fn, embed_note = (embed, None) if embed is not None else _embedder(project)
    report = build_report(project, models, runs, plan, peers, peer_notes, inter_notes, judges, verdicts, embed_fn,
                          embed_note)
    report["timings"] = {"models": {r.model.name: round(r.seconds, 1) for r in runs.values()},
                         "judge": round(judge_seconds, 1), "total": round(time.monotonic() - started, 1)}
    report["smoke"] = training_smoke(ws)
    _write(ws, report, runs, plan, judges)
    return stats(report)


def training_smoke(ws: Workspace, excerpt: int = 300) -> dict[str, dict[str, Any]]:
    """The SFT/DPO post-training smoke tests (from each finished stage's stats.json): ok, problems, one answer."""
    import json

    found: dict[str, dict[str, Any]] = {}
    for stage in TUNED:
        path = ws.stage_dir(stage) / "stats.json"
        if ws.manifest(stage) is None or not path.is_file():
            continue
        smoke = json.loads(path.read_text(encoding="utf-8")).get("smoke") or {}
        if not smoke:  # trained before persllm recorded smoke tests
            continue
        outputs = smoke.get("outputs") or []
        shown = next((o for o in outputs if o.get("problems")), outputs[0] if outputs else None)
        example = None if shown is None else {
            "question": shown.get("question", ""), "text": str(shown.get("text", ""))[:excerpt],
            "tokens": shown.get("tokens"), "problems": shown.get("problems", [])}
        found[stage] = {"ok": bool(smoke.get("ok", False)), "problems": smoke.get("problems", []),
                        "example": example, "path": str(ws.stage_dir(stage) / "smoke.json")}
    return found


def fingerprint_config(project: Project) -> dict[str, Any]:
    """Everything the eval result depends on besides upstream outputs (for the pipeline's stage fingerprint)."""
    from pathlib import Path

    from persllm.config import load_project

    probe_file = Path(project.eval.probes) if project.eval.probes else None
    digest = file_sha256(probe_file) if probe_file and probe_file.is_file() else ""
    interview_file = interviews.interview_path(project)  # edited questions change every interview score
    interview_digest = file_sha256(interview_file) if interview_file and interview_file.is_file() else ""
    peers: dict[str, dict[str, str]] = {}
    for entry in project.peers:  # a peer's newly trained adapter changes the inter scores
        try:
            peer_ws = Workspace.of(load_project(project.root / entry))
        except PersllmError:
            continue
        peers[entry] = {v: m.digest for v in TUNED if (m := peer_ws.manifest(v)) is not None}
    judge_spec = project.judge or project.teacher
    return {"eval": resolved_dict(project.eval), "judge": judge_spec.spec, "teacher": project.teacher.spec,
            "seed": project.seed, "peers": peers, "probe_file": digest, "interview_file": interview_digest,
            "keep_cot": project.sft.keep_cot, "temporal_labels": project.sft.temporal_labels,
            "decoding": resolved_dict(project.decoding), "small_model_decoding": SMALL_MODEL_REPETITION.as_dict(),
            # 2: evidence probes, paired tests; 3: anti-repetition decoding; 4: trained facts, dates checked;
            # 5: false premises swap like for like; 6: a premise's first word lowercased unless a name
            "version": "6"}


# -- what to ask ------------------------------------------------------------------------------------------------------
def _plan(project: Project, samples: Sequence[Sample], passages: Sequence[Passage], ipip_stages: list[str]) -> Plan:
    cfg = project.eval
    stage_ids = [s.id for s in project.stages]
    extra = load_probes(cfg.probes, stage_ids) if cfg.probes else []
    generated = default_probes(project, samples, passages, cfg.max_probes)
    taken = {p.id for p in generated}
    probes = generated + [p for p in extra if p.id not in taken]
    interview = ipip.interview_items(project.language, cfg.ipip_interview_items) if cfg.judge_items else []
    interview_file = interviews.interview_path(project)
    # The file is validated even without a judge (a broken file fails now), but only asked when it will be scored.
    questions = interviews.load_interview(interview_file, stage_ids) if interview_file else []
    return Plan(probes=probes, heldout=_heldout(samples, stage_ids, cfg.heldout_questions),
                words=_words(samples, passages, cfg.heldout_questions), ipip_stages=ipip_stages,
                interview=interview if cfg.ipip else [], user_probes=len(probes) - len(generated),
                questions=questions if cfg.judge_items else [],
                few_shot=_few_shot(project, samples, passages),
                decoding=Decoding(cfg.max_new_tokens, cfg.temperature, project.seed, _answer_prefix(project),
                                  project.language))


def _few_shot(project: Project, samples: Sequence[Sample], passages: Sequence[Passage]) -> FewShot:
    """Training-split examples per stage for the few-shot baseline, and the pronoun the material uses."""
    from persllm.construct import facts as F

    ref = F.persona_ref(project.name, project.language, [p.text for p in passages if p.kind == "knowledge"],
                        project.aliases)
    return FewShot({s.id: few_shot_examples(samples, s.id) for s in project.stages}, ref.pronoun)


def _answer_prefix(project: Project) -> str:
    """Without `think`, local models start at [Response] (only meaningful in the CoT answer format).

    No trailing space: in training the space after the tag belongs to the next word's token (" I"); a lone space
    token is what precedes digits in Gemma's vocabulary, and forcing it makes every answer start with a year.
    """
    return "" if project.eval.think or not project.sft.keep_cot else template.RESPONSE_TAG


def _heldout(samples: Sequence[Sample], stages: Sequence[str], limit: int) -> list[Sample]:
    """Test-split questions per stage, kinds interleaved (ordinary, opinion, induced) so a small limit mixes them."""
    out = []
    for stage in stages:
        by_kind = [[s for s in samples if s.split == "test" and s.stage == stage and s.kind == k]
                   for k in ("ordinary", "opinion", "induced")]
        mixed = [s for group in _zip_longest(by_kind) for s in group]
        out += mixed[:limit]
    return out


def _zip_longest(groups: list[list[Sample]]) -> list[list[Sample]]:
    width = max((len(g) for g in groups), default=0)
    return [[g[i] for g in groups if i < len(g)] for i in range(width)]


def _words(samples: Sequence[Sample], passages: Sequence[Passage], limit: int) -> list[tuple[Sample, Passage]]:
    """Held-out style passages (the persona's own words seeding test samples) with the first question they seeded."""
    style = {p.id: p for p in passages if p.kind == "style"}
    chosen: dict[str, tuple[Sample, Passage]] = {}
    for s in samples:
        fresh = s.split == "test" and s.seed_id in style and s.seed_id not in chosen and s.kind != "general"
        if fresh and sum(1 for c, _ in chosen.values() if c.stage == s.stage) < max(1, limit):
            chosen[s.seed_id] = (s, style[s.seed_id])
    return list(chosen.values())


def _ipip_stages(project: Project) -> list[str]:
    cfg = project.eval
    if not cfg.ipip:
        return []
    stage_ids = [s.id for s in project.stages]
    named = {"first": stage_ids[0], "last": stage_ids[-1]}
    unknown = [s for s in cfg.ipip_stages if s not in stage_ids and s not in named]
    if unknown:
        raise ConfigError(f"eval.ipip_stages: unknown stage(s) {', '.join(unknown)}; use stage ids "
                          f"({', '.join(stage_ids)}), first or last")
    chosen = {named.get(s, s) for s in cfg.ipip_stages}
    return [s for s in stage_ids if s in chosen] or stage_ids


# -- judging ---------------------------------------------------------------------------------------------------------
def _open_judges(project: Project, ws: Workspace, plan: Plan, judge: Backend | None,
                 teacher: Backend | None) -> Judges:
    """The judge (project.judge, else the teacher) and, for Big Five targets, the teacher; opened early to fail fast."""
    from persllm.backends import open_backend
    from persllm.prompts import load_prompts

    cfg = project.eval
    spec = project.judge or project.teacher
    wants_target = bool(plan.ipip_stages) and cfg.target_from_teacher and any(
        s not in cfg.target for s in plan.ipip_stages)
    judge_backend = teacher_backend = None
    if cfg.judge_items > 0:
        judge_backend = judge or open_backend(spec, seed=project.seed, check=True)
    if wants_target:
        same = project.judge is None and judge_backend is not None  # no judge: set means the teacher judges
        teacher_backend = teacher or (judge_backend if same else open_backend(project.teacher, seed=project.seed,
                                                                               check=True))
    make = functools.partial(Judge, prompts=load_prompts(project.language), cache_path=ws.cache_dir / "judge.sqlite",
                             repeats=cfg.judge_repeats, retries=cfg.judge_retries, max_tokens=cfg.judge_max_tokens,
                             seed=project.seed)
    made_judge = made_teacher = None
    if judge_backend is not None:
        made_judge = make(judge_backend, spec=judge_backend.name if judge else spec.spec)
    if teacher_backend is not None:
        made_teacher = make(teacher_backend, spec=teacher_backend.name if teacher else project.teacher.spec)
    reason = "" if made_judge else "no judge: eval.judge_items is 0"
    return Judges(made_judge, made_teacher, reason)


def _judge_all(project: Project, judges: Judges, runs: dict[str, ModelRun], plan: Plan,
               passages: Sequence[Passage], progress: Progress) -> dict[str, Any]:
    """Every judged criterion: accuracy, probe references, ranking, IPIP and file interviews, Big Five targets."""
    from persllm.prompts import load_prompts

    cfg = project.eval
    prompts = load_prompts(project.language)
    out: dict[str, Any] = {}
    models = list(runs.values())
    if judges.judge is not None:
        j = judges.judge
        out["accuracy"] = j.run(precision.accuracy_tasks(project, prompts, models, plan.heldout, cfg.judge_items),
                                progress, "judge accuracy")
        out["probe"] = j.run(probes.probe_tasks(project, prompts, models, plan, cfg.judge_items), progress,
                             "judge probes")
        out["pairwise"] = j.run(ranking.pairwise_tasks(project, models, plan.heldout, cfg.judge_items), progress,
                                "judge ranking")
        out["ipip"] = j.run(big_five.interview_tasks(project, models, plan), progress, "judge interviews")
        out["interview"] = j.run(interview_criterion.interview_tasks(project, prompts, models, plan, passages,
                                                                     cfg.judge_items), progress,
                                 "judge interview questions")
    if judges.teacher is not None:
        stages = [s for s in plan.ipip_stages if s not in cfg.target]
        out["target"] = judges.teacher.run(big_five.target_tasks(project, passages, stages), progress,
                                           "Big Five targets")
    return out


def _embedder(project: Project) -> tuple[Embed | None, str | None]:
    """A sentence-transformers encoder when one is configured and installed, else the reason there is none."""
    name = project.eval.embedding_model or project.construct.embedding_model
    if not name:
        return None, ("no embedding model configured; set eval.embedding_model to a sentence-transformers model "
                      "(pip install sentence-transformers) to add cosine-similarity scores")
    try:
        model = sentence_model(name)
    except ImportError:
        return None, f"eval.embedding_model {name!r} needs sentence-transformers: pip install sentence-transformers"
    except Exception as exc:  # noqa: BLE001 - a model that cannot be loaded only costs this one measure
        return None, f"embedding model {name!r} could not be loaded: {str(exc)[:200]}"
    return (lambda texts: model.encode(texts, normalize_embeddings=True).tolist()), None


def _write(ws: Workspace, report: dict[str, Any], runs: dict[str, ModelRun], plan: Plan, judges: Judges) -> None:
    out = ws.stage_dir("eval")
    write_json(out / "report.json", report)
    write_text(out / "report.html", render_html(report))
    write_jsonl(out / "answers.jsonl", (to_record(a) for run in runs.values() for a in run.answers))
    records = [r | {"role": "judge"} for r in (judges.judge.records if judges.judge else [])]
    records += [r | {"role": "teacher"} for r in (judges.teacher.records if judges.teacher else [])
                if judges.teacher is not judges.judge]
    write_jsonl(out / "verdicts.jsonl", records)
    write_jsonl(out / "probes.jsonl", (probe_to_json(p) for p in plan.probes))
