"""Data construction: passages -> questions of three kinds -> chain-of-thought golden answers -> DPO material.

Read top to bottom, `construct` is the recipe (PersLLM sections 1.3-1.11): plan seed slots with a leak-free split,
generate questions, remove near-duplicates across stages, retrieve each question's context from its own stage,
write golden answers, re-answer general instructions in the persona's voice, and produce rejected answers for DPO.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from persllm.backends.base import Backend
from persllm.config import Project
from persllm.construct import facts as F
from persllm.construct.dedup import distinct_questions
from persllm.construct.full import FullMethod
from persllm.construct.grounded import GroundedMethod
from persllm.construct.jobs import Failed, Runner
from persllm.construct.plan import Slot, make_plan
from persllm.construct.quality import audit
from persllm.construct.records import Answer, Draft, GeneralItem, Question
from persllm.construct.retrieval import Context, Retriever
from persllm.errors import DataError
from persllm.general import load_general
from persllm.progress import NULL, Progress
from persllm.prompts import load_prompts
from persllm.types import Negative, Passage, Sample, stable_id

VERSION = "1"


@dataclass
class ConstructResult:
    """Everything construct produces."""

    samples: list[Sample]
    negatives: list[Negative]
    stats: dict[str, Any] = field(default_factory=dict)


def resolve_mode(project: Project) -> str:
    """grounded for the embedded default teacher (too weak to write answers), full for any other teacher."""
    mode = project.construct.mode
    if mode == "auto":
        return "grounded" if project.teacher.backend in ("default",) else "full"
    return mode


def construct(project: Project, passages: Sequence[Passage], teacher: Backend,
              progress: Progress = NULL) -> ConstructResult:
    """Build personified samples and DPO negatives for every stage of the project."""
    started = time.monotonic()
    cfg = project.construct
    prompts = load_prompts(project.language)
    mode = resolve_mode(project)
    runner = Runner(teacher, cfg.attempts, progress)
    retrievers = {s.id: Retriever([p for p in passages if p.stage == s.id], cfg.embedding_model)
                  for s in project.stages}
    ref = F.persona_ref(project.name, project.language, [p.text for p in passages if p.kind == "knowledge"],
                        project.aliases)
    # Held-out seeds (knowledge and style) are never retrievable for training items, so every default probe built
    # from them asks about material no training sample has seen.
    slots = make_plan(project, passages)
    held_out = frozenset(s.seed.id for s in slots if s.split == "test")
    method = (FullMethod(project, prompts, runner) if mode == "full"
              else GroundedMethod(project, prompts, runner, ref, retrievers, held_out))
    progress.note(f"construct mode: {mode} (teacher {teacher.name})")

    # 1. Questions of three kinds for every seed slot; duplicates dropped within each stage.
    questions = method.questions(slots)
    asked = [(s, q) for s in slots if isinstance(q := questions[s.id], Question)]
    keep, dropped = distinct_questions(asked, cfg.dedup_threshold)
    asked = [asked[i] for i in keep]

    # 2. Golden answers, each from its own stage's retrieved material (temporal conditioning); training items never
    #    see a held-out seed, so held-out probes and perplexity measure generalisation, not recall.
    drafts = [Draft(s, q, retrievers[s.stage].context(s.seed, q.text, cfg.knowledge_budget, cfg.style_budget,
                                                      held_out if s.split == "train" else frozenset()))
              for s, q in asked]
    answers = method.answers(drafts)
    answered = [d for d in drafts if isinstance(answers[d.slot.id], Answer)]
    samples = [_sample(project, d, answers[d.slot.id], mode, prompts.version) for d in answered]

    # 3. Stylised general data (the method's mode 3).
    items = _general_items(project, retrievers, held_out)
    general = method.general(items)
    samples += [_general_sample(project, item, general[item.id], mode, prompts.version)
                for item in items if isinstance(general[item.id], Answer)]

    # 4. Rejected-answer material for automated DPO.
    other = _other_stage_contexts(project, answered, retrievers, held_out) if len(project.stages) > 1 else {}
    rejected = method.negatives(answered, other, cfg.negatives)
    negatives = [Negative(id=stable_id(sid, neg_type), sample_id=_sample_id(project, sid), type=neg_type,
                          response=a.response, analysis=a.analysis,
                          meta={"origin": a.origin, **({"stage": other[sid][0]} if neg_type == "other_stage" else {})})
                 for (sid, neg_type), a in sorted(rejected.items()) if isinstance(a, Answer)]

    stats = _stats(project, mode, slots, questions, dropped, answers, general, samples, negatives, runner, teacher)
    stats["audit"] = audit(samples, passages, held_out, project.language, ref.aliases)
    _require_samples(project, samples, stats)
    stats["seconds"] = round(time.monotonic() - started, 1)
    return ConstructResult(samples, negatives, stats)


def _require_samples(project: Project, samples: Sequence[Sample], stats: dict[str, Any]) -> None:
    """Stop with the teacher's rejection reasons when a stage got no personified sample at all."""
    have = {s.stage for s in samples if s.kind != "general" and s.split == "train"}
    empty = [s.id for s in project.stages if s.id not in have]
    if empty:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats["rejected"].items(), key=lambda kv: -kv[1])[:5])
        raise DataError(f"construct produced no training samples for stage(s) {', '.join(empty)} "
                        f"(mode {stats['mode']}, teacher {stats['teacher']}; rejected outputs: {reasons or 'none'}); "
                        "check the teacher, or use construct.mode=grounded for a weak local model")


def _sample_id(project: Project, slot_id: str) -> str:
    return f"{project.slug}/{slot_id}"


def _sample(project: Project, draft: Draft, answer: Answer, mode: str, version: str) -> Sample:
    slot, question = draft.slot, draft.question
    meta = {"mode": mode, "prompt_version": version, "variant": slot.variant,
            "origin": {"question": question.origin, "answer": answer.origin, **_fact_origin(answer)},
            **question.meta}
    return Sample(id=_sample_id(project, slot.id), persona=project.slug, stage=slot.stage,
                  time_label=project.stage(slot.stage).label, kind=slot.kind,  # type: ignore[arg-type]
                  question=question.text, analysis=answer.analysis, response=answer.response, seed_id=slot.seed.id,
                  context_ids=draft.context.ids, split=slot.split, meta=meta)  # type: ignore[arg-type]


def _fact_origin(answer: Answer) -> dict[str, str]:
    return {"fact": answer.meta["fact_origin"]} if "fact_origin" in answer.meta else {}


def _general_items(project: Project, retrievers: dict[str, Retriever],
                   held_out: frozenset[str]) -> list[GeneralItem]:
    """A seeded choice of general instructions per stage, each with that stage's style context."""
    n = project.construct.general_per_stage
    if n <= 0:
        return []
    records, _ = load_general(project)
    items = []
    for stage in project.stages:
        rng = random.Random(stable_id(project.seed, stage.id, "general"))
        chosen = rng.sample(records, k=min(n, len(records)))
        styles = [p for p in retrievers[stage.id].passages if p.kind == "style" and p.id not in held_out][:3]
        style = " ... ".join(p.text for p in styles)
        for record in chosen:
            items.append(GeneralItem(id=f"{stage.id}-gen-{stable_id(record.id, stage.id, length=10)}",
                                     stage=stage.id, instruction=record.instruction, reference=record.reference,
                                     known_since=record.known_since, style=style,
                                     style_ids=tuple(p.id for p in styles)))
    return items


def _general_sample(project: Project, item: GeneralItem, answer: Answer, mode: str, version: str) -> Sample:
    return Sample(id=_sample_id(project, item.id), persona=project.slug, stage=item.stage,
                  time_label=project.stage(item.stage).label, kind="general", question=item.instruction,
                  analysis=answer.analysis, response=answer.response, seed_id="", context_ids=item.style_ids,
                  split="train", meta={"mode": mode, "prompt_version": version,
                                       "origin": {"answer": answer.origin}, **answer.meta})


def _other_stage_contexts(project: Project, drafts: Sequence[Draft], retrievers: dict[str, Retriever],
                          held_out: frozenset[str]) -> dict[str, tuple[str, Context]]:
    """For each question, the next stage's own context (retrieved from that stage, not copied from this one)."""
    cfg = project.construct
    ids = [s.id for s in project.stages]
    out = {}
    for draft in drafts:
        other = ids[(ids.index(draft.slot.stage) + 1) % len(ids)]
        exclude = held_out if draft.slot.split == "train" else frozenset()
        ranked = [p for p in retrievers[other].rank(draft.question.text) if p.id not in exclude]
        if ranked:
            ctx = retrievers[other].context(ranked[0], draft.question.text, cfg.knowledge_budget, cfg.style_budget,
                                            exclude)
            out[draft.slot.id] = (other, ctx)
    return out


def _stats(project: Project, mode: str, slots: Sequence[Slot], questions: dict[str, Any], dropped: dict[int, int],
           answers: dict[str, Any], general: dict[str, Any], samples: Sequence[Sample], negatives: Sequence[Negative],
           runner: Runner, teacher: Backend) -> dict[str, Any]:
    personified = [s for s in samples if s.kind != "general"]
    origins: Counter[str] = Counter()
    for s in samples:
        for part, origin in s.meta.get("origin", {}).items():
            origins[f"{part}:{origin}"] += 1
    return {
        "mode": mode,
        "teacher": teacher.name,
        "slots": len(slots),
        "questions_failed": sum(1 for q in questions.values() if not isinstance(q, Question)),
        "near_duplicates_removed": len(dropped),
        "answers_failed": sum(1 for a in answers.values() if not isinstance(a, Answer)),
        # Slots (and general items) that got no sample, by the reason the last attempt gave.
        "dropped": dict(Counter(r.reason for r in [*questions.values(), *answers.values(), *general.values()]
                                if isinstance(r, Failed)) + Counter({"near_duplicate": len(dropped)})),
        "samples": len(samples),
        "by_kind": dict(Counter(s.kind for s in samples)),
        "by_stage": dict(Counter(s.stage for s in samples)),
        "by_split": dict(Counter(s.split for s in personified)),
        "by_stage_kind_split": dict(Counter(f"{s.stage}/{s.kind}/{s.split}" for s in personified)),
        "origins": dict(sorted(origins.items())),
        "negatives": dict(Counter(n.type for n in negatives)),
        "rejected": dict(runner.rejected),
        "accepted": dict(runner.accepted),
        "teacher_usage": teacher.usage.as_dict(),
    }
