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
from persllm.construct.plan import SEED_MISFITS, Slot, make_plan, second_choices
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

    def ask_and_answer(todo: Sequence[Slot], before: Sequence[tuple[Slot, Question]]) -> Round:
        # 1. Questions for the slots; duplicates (of each other and of the questions kept `before`) dropped within
        #    each stage.
        questions = method.questions(todo)
        asked = [*before, *((s, q) for s in todo if isinstance(q := questions[s.id], Question))]
        keep, dropped = distinct_questions(asked, cfg.dedup_threshold)
        asked = [asked[i] for i in keep if i >= len(before)]
        # 2. Golden answers, each from its own stage's retrieved material (temporal conditioning); training items
        #    never see a held-out seed, so held-out probes and perplexity measure generalisation, not recall.
        drafts = [Draft(s, q, retrievers[s.stage].context(s.seed, q.text, cfg.knowledge_budget, cfg.style_budget,
                                                          held_out if s.split == "train" else frozenset()))
                  for s, q in asked]
        return Round(questions, dropped, drafts, method.answers(drafts))

    first = ask_and_answer(slots, [])
    # A seed that cannot carry an ordinary or opinion question gets one of the other kind, keeping the kind mix.
    misfits = [s for s in slots if _reason(first.questions[s.id]) in SEED_MISFITS
               or _reason(first.answers.get(s.id)) in SEED_MISFITS]
    retries = second_choices(project, misfits)
    second = ask_and_answer(list(retries.values()), [(d.slot, d.question) for d in first.drafts])
    answers = first.answers | second.answers
    replaced = {sid for sid, slot in retries.items() if isinstance(answers.get(slot.id), Answer)}
    drafted = [(d, answer) for d in [*first.drafts, *second.drafts] if isinstance(answer := answers[d.slot.id], Answer)]
    answered = [d for d, _ in drafted]
    samples = [_sample(project, d, a, mode, prompts.version) for d, a in drafted]

    # 3. Stylised general data (the method's mode 3).
    items = _general_items(project, retrievers, held_out)
    general = method.general(items)
    samples += [_general_sample(project, item, answer, mode, prompts.version)
                for item in items if isinstance(answer := general[item.id], Answer)]

    # 4. Rejected-answer material for automated DPO.
    other = _other_stage_contexts(project, answered, retrievers, held_out) if len(project.stages) > 1 else {}
    rejected = method.negatives(answered, other, cfg.negatives)
    negatives = [Negative(id=stable_id(sid, neg_type), sample_id=_sample_id(project, sid), type=neg_type,
                          response=a.response, analysis=a.analysis,
                          meta={"origin": a.origin, **({"stage": other[sid][0]} if neg_type == "other_stage" else {})})
                 for (sid, neg_type), a in sorted(rejected.items()) if isinstance(a, Answer)]

    # Failures of a slot whose second choice became a sample are not losses: the counts leave them out.
    questions = {k: v for k, v in (first.questions | second.questions).items() if k not in replaced}
    answers = {k: v for k, v in answers.items() if k not in replaced}
    duplicates = len(first.dropped) + len(second.dropped)
    stats = _stats(project, mode, slots, questions, duplicates, answers, general, samples, negatives, runner,
                   teacher)
    stats["second_choices"] = {"tried": len(retries), "kept": len(replaced)}
    stats["audit"] = audit(samples, passages, held_out, project.language, ref.aliases)
    _require_samples(project, samples, stats)
    stats["seconds"] = round(time.monotonic() - started, 1)
    return ConstructResult(samples, negatives, stats)


@dataclass(frozen=True)
class Round:
    """One pass of questions and answers over a list of slots."""

    questions: dict[str, Question | Failed]
    dropped: dict[int, int]  # near-duplicate questions (indices into that round's asked list)
    drafts: list[Draft]
    answers: dict[str, Answer | Failed]


def _reason(result: object) -> str:
    """The reason of a Failed result, "" for anything else."""
    return result.reason if isinstance(result, Failed) else ""


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


def _stats(project: Project, mode: str, slots: Sequence[Slot], questions: dict[str, Any], duplicates: int,
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
        "near_duplicates_removed": duplicates,
        "answers_failed": sum(1 for a in answers.values() if not isinstance(a, Answer)),
        # Slots (and general items) that got no sample, by reason: a slot tried again as the other kind counts once
        # per try, one whose second choice became a sample not at all.
        "dropped": dict(Counter(r.reason for r in [*questions.values(), *answers.values(), *general.values()]
                                if isinstance(r, Failed)) + Counter({"near_duplicate": duplicates})),
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
