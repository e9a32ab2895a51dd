"""Everything one model under test must produce: answers, Big Five administrations and held-out perplexity.

A model is loaded once and does all its work in a few large batches: one decoding pass with greedy rows (probes,
held-out questions, IPIP interview questions) and sampled rows (two samples per held-out question, the same
questions at the other stages, peers' personas on the same backend), one log-likelihood pass per IPIP stage, and
one scoring pass for held-out perplexity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from persllm import template
from persllm.backends import Backend, GenParams
from persllm.config import Project
from persllm.errors import ConfigError, PersllmError
from persllm.eval import ipip
from persllm.eval.generate import (
    Answer,
    Ask,
    Decoding,
    FewShot,
    ModelUnderTest,
    RagIndex,
    answer_all,
    as_local,
    few_shot_prompt,
    persona_messages,
)
from persllm.eval.interview import PURPOSE as INTERVIEW_Q
from persllm.eval.interview import Question
from persllm.eval.metrics import perplexity
from persllm.progress import Progress
from persllm.types import Passage, Probe, Sample
from persllm.variants import TUNED
from persllm.workspace import Workspace

Opener = Callable[[ModelUnderTest], Backend]


@dataclass(frozen=True)
class Persona:
    """A persona a model is asked to play: this project's, or a peer's (at the peer's latest stage)."""

    slug: str
    project: Project
    rag: RagIndex | None = None


@dataclass
class Plan:
    """What every model is asked (the same for all of them)."""

    probes: list[Probe]
    heldout: list[Sample]
    words: list[tuple[Sample, Passage]]  # held-out style passages and the question they answer
    ipip_stages: list[str]
    interview: list[ipip.Item]
    decoding: Decoding
    user_probes: int = 0  # probes from eval.probes (the rest are generated)
    few_shot: FewShot | None = None  # examples for base models without a chat template of their own
    questions: list[Question] = field(default_factory=list)  # eval.interview (Character-LLM), asked when judged


@dataclass
class ModelRun:
    """The raw results of one model."""

    model: ModelUnderTest
    answers: list[Answer] = field(default_factory=list)
    ipip: dict[str, dict[str, Any]] = field(default_factory=dict)  # persona/stage -> administration
    perplexity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    prompting: str = ""  # how the model was prompted when not through the chat template (few-shot baseline)
    repetition: dict[str, Any] = field(default_factory=dict)  # the anti-repetition decoding its answers had


def greedy_asks(project: Project, plan: Plan, rag: RagIndex | None) -> list[Ask]:
    """Probes, held-out questions, IPIP interview questions and eval.interview questions, answered greedily."""
    slug = project.slug
    asks = [Ask(f"probe/{p.id}", "probe", p.id, slug, p.stage, p.question,
                persona_messages(project, p.stage, p.question, rag)) for p in plan.probes]
    asks += [Ask(f"heldout/{s.id}", "heldout", s.id, slug, s.stage, s.question,
                 persona_messages(project, s.stage, s.question, rag)) for s in plan.heldout]
    for stage in plan.ipip_stages:
        for item in plan.interview:
            question = ipip.interview_question(item, project.language)
            asks.append(Ask(f"interview/{item.id}/{stage}", "interview", item.id, slug, stage, question,
                            persona_messages(project, stage, question, rag)))
    asks += [Ask(f"{INTERVIEW_Q}/{q.id}/{stage}", INTERVIEW_Q, q.id, slug, stage, q.question,
                 persona_messages(project, stage, q.question, rag)) for q in plan.questions for stage in q.stages]
    return asks


def sampled_asks(project: Project, plan: Plan, rag: RagIndex | None, peers: Sequence[Persona]) -> list[Ask]:
    """Two samples per held-out question at its own stage, one at every other stage, one per peer persona."""
    asks = []
    stages = [s.id for s in project.stages]
    for s in plan.heldout:
        own = persona_messages(project, s.stage, s.question, rag)
        asks += [Ask(f"sample/{s.id}/{s.stage}/{k}", "sample", s.id, project.slug, s.stage, s.question, own, k)
                 for k in (1, 2)]
        asks += [Ask(f"other_stage/{s.id}/{o}", "other_stage", s.id, project.slug, o, s.question,
                     persona_messages(project, o, s.question, rag), 1) for o in stages if o != s.stage]
    return asks + peer_asks(plan, peers)


def peer_asks(plan: Plan, peers: Sequence[Persona]) -> list[Ask]:
    """Each held-out question asked once (sampled) as every peer persona, at the peer's latest stage."""
    asks = []
    for s in plan.heldout:
        for peer in peers:
            stage = peer.project.stages[-1].id
            asks.append(Ask(f"peer/{s.id}/{peer.slug}", "peer", s.id, peer.slug, stage, s.question,
                            persona_messages(peer.project, stage, s.question, peer.rag), 1))
    return asks


def run_model(project: Project, model: ModelUnderTest, backend: Backend, plan: Plan, rag: RagIndex | None,
              same_backend_peers: Sequence[Persona], progress: Progress) -> ModelRun:
    """All answers and measurements of one model (peers played by the same backend included)."""
    started = time.monotonic()
    run = ModelRun(model)
    asks = greedy_asks(project, plan, rag) + sampled_asks(project, plan, rag, same_backend_peers)
    shots = few_shot_for(project, model, backend, plan)
    if shots is not None:  # the persona's own questions as a transcript to continue; peers keep their prompts
        asks = [replace(a, raw=few_shot_prompt(project, a.stage, a.question, shots, rag))
                if a.persona == project.slug else a for a in asks]
        run.prompting = shots.describe()
    run.repetition = backend.repetition.as_dict()
    run.answers += answer_all(model, backend, asks, plan.decoding, progress, "answers")
    personas = [Persona(project.slug, project, rag)] + list(same_backend_peers)
    for persona in personas:
        stages = plan.ipip_stages if persona.slug == project.slug else [persona.project.stages[-1].id]
        for stage in stages:
            run.ipip[f"{persona.slug}/{stage}"] = administer(persona, stage, model, backend, plan, progress)
    run.perplexity = heldout_perplexity(project, model, backend, plan.words, rag, progress, shots)
    run.seconds = time.monotonic() - started
    return run


def administer(persona: Persona, stage: str, model: ModelUnderTest, backend: Backend, plan: Plan,
               progress: Progress) -> dict[str, Any]:
    """IPIP-NEO-120 choices at one stage: log-likelihood of the options for local models, else generated digits."""
    project = persona.project
    prompts = ipip.choice_prompts(project.language)
    # Retrieval for the 'rag' baseline uses one query for the whole inventory, so all items share a system prompt.
    system = persona_messages(project, stage, f"{project.name} {project.stage(stage).description}", persona.rag)[0]
    requests = [[system, *template.prompt_messages(template.context_for(project, stage), q)[1:]] for _, q in prompts]
    with progress.task(f"IPIP-NEO-120 {persona.slug}/{stage} ({model.name})", total=len(prompts)) as task:
        if model.local:
            logprobs = as_local(backend).option_logprobs(requests, ipip.OPTIONS, prefix=_response_prefix(project))
            raw = [ipip.choices_from_logprobs(lp) for lp in logprobs]
            calibrated = ipip.calibrated_choices(logprobs)
            mass = sum(sum(math.exp(v) for v in lp) for lp in logprobs) / len(logprobs)  # on the five options
            task.advance(len(prompts))
            return {"method": "loglik", "answers": {item.id: c for (item, _), c in zip(prompts, calibrated)},
                    "raw_answers": {item.id: c for (item, _), (c, _) in zip(prompts, raw)}, "missing": 0,
                    "option_mass": round(mass, 4),
                    "probs": {item.id: [round(p, 4) for p in probs] for (item, _), (_, probs) in zip(prompts, raw)}}
        # Room for a short analysis before the digit: endpoints are never forced to start at [Response].
        params = GenParams(temperature=0.0, max_tokens=96, seed=plan.decoding.seed)
        answers: dict[str, int] = {}
        texts: dict[str, str] = {}
        for index, result in backend.complete_many([list(r) for r in requests], params):
            item = prompts[index][0]
            text = "" if isinstance(result, Exception) else template.visible_answer(result.text)
            texts[item.id] = text
            if (choice := ipip.parse_choice(text)) is not None:
                answers[item.id] = choice
            task.advance(1)
    return {"method": "generated", "answers": answers, "missing": len(prompts) - len(answers), "raw": texts}


def few_shot_for(project: Project, model: ModelUnderTest, backend: Backend, plan: Plan) -> FewShot | None:
    """The few-shot prompting for the base and rag baselines of a base model without a chat template, else None."""
    mode = project.eval.base_prompting
    if model.variant != "base" or not model.local or mode == "chat" or plan.few_shot is None:
        return None
    if mode == "auto" and backend.own_chat_template:
        return None
    return plan.few_shot


def heldout_perplexity(project: Project, model: ModelUnderTest, backend: Backend,
                       words: Sequence[tuple[Sample, Passage]], rag: RagIndex | None,
                       progress: Progress, shots: FewShot | None = None) -> dict[str, Any]:
    """Per-token perplexity of the persona's held-out own words as the answer to the question they seeded."""
    if not model.local:
        return {"unavailable": f"{model.name} does not expose log-likelihoods (only local transformers models do)"}
    if not words:
        return {"unavailable": "no held-out style passages (the test split has no sample seeded by the persona's "
                               "own words; raise construct.test_fraction or add style material)"}
    hf = as_local(backend)
    prefix = _response_prefix(project).rstrip()
    if shots is not None:  # the persona's words as the few-shot transcript's next answer
        pairs = [(few_shot_prompt(project, s.stage, s.question, shots, rag), " " + p.text) for s, p in words]
    else:
        pairs = [(hf.render(list(persona_messages(project, s.stage, s.question, rag))) + prefix,
                  (" " if prefix else "") + p.text) for s, p in words]
    with progress.task(f"held-out perplexity ({model.name})", total=len(pairs)) as task:
        scored = hf.score(pairs)
        task.advance(len(pairs))
    by_stage: dict[str, list[float]] = {}
    for (sample, _), (logprob, n) in zip(words, scored):
        acc = by_stage.setdefault(sample.stage, [0.0, 0.0, 0.0])
        acc[0] += logprob
        acc[1] += n
        acc[2] += 1
    total_lp, total_n = sum(v[0] for v in by_stage.values()), sum(v[1] for v in by_stage.values())
    return {"overall": _round(perplexity(total_lp, int(total_n))), "tokens": int(total_n),
            "by_stage": {s: {"perplexity": _round(perplexity(v[0], int(v[1]))), "tokens": int(v[1]),
                             "passages": int(v[2])} for s, v in by_stage.items()}}


def _response_prefix(project: Project) -> str:
    """What a tuned answer starts with: '[Response] ' in the CoT format (the analysis is skipped), else nothing."""
    return template.RESPONSE_TAG + " " if project.sft.keep_cot else ""


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def load_peers(project: Project, rag_tokens: int) -> tuple[list[Persona], list[str]]:
    """Other personas (project.peers) whose prompts the same backends can play; notes for those that cannot load."""
    from persllm.config import load_project

    peers, notes = [], []
    for entry in project.peers:
        try:
            peer = load_project(project.root / entry)
        except PersllmError as exc:
            notes.append(f"peer {entry} could not be loaded: {exc}")
            continue
        if peer.slug == project.slug:
            continue
        peer_ws = Workspace.of(peer)
        rag = None
        if peer_ws.passages_file.is_file():
            rag = RagIndex(peer_ws.passages(), set(), rag_tokens, peer.language)
        peers.append(Persona(peer.slug, peer, rag))
    return peers, notes


def run_models(project: Project, models: Sequence[ModelUnderTest], plan: Plan, rag: RagIndex,
                peers: Sequence[Persona], opener: Opener, remote: dict[str, Backend],
                progress: Progress) -> tuple[dict[str, ModelRun], dict[str, list[str]]]:
    """Each model in turn (base and rag share one loaded model); tuned models then play the peers' adapters."""
    runs: dict[str, ModelRun] = {}
    notes: dict[str, list[str]] = {m.name: [] for m in models}
    if not project.peers:
        for m in models:
            notes[m.name].append("no other personas: list their project directories under `peers:` in persona.yaml")
    groups: dict[str, list[ModelUnderTest]] = {}
    for m in models:
        groups.setdefault(m.variant if m.local else m.name, []).append(m)
    for group in groups.values():
        backend = remote.get(group[0].name) or opener(group[0])
        try:
            for m in group:
                same = _same_backend_peers(m, peers, notes[m.name])
                runs[m.name] = run_model(project, m, backend, plan, rag if m.rag else None, same, progress)
        finally:
            if group[0].local:
                backend.close()
        for m in group:
            if m.name in TUNED:
                _tuned_peers(project, m, plan, peers, runs[m.name], notes[m.name], progress)
    return {m.name: runs[m.name] for m in models}, notes


def _same_backend_peers(model: ModelUnderTest, peers: Sequence[Persona], notes: list[str]) -> list[Persona]:
    if model.name in TUNED:
        return []  # a tuned model only plays its own persona; the peer's own tuned adapter plays the peer
    if not model.rag:
        return [Persona(p.slug, p.project) for p in peers]
    for p in peers:
        if p.rag is None:
            notes.append(f"peer {p.slug} has no ingest output for retrieval; run `persllm ingest {p.project.root}`")
    return [p for p in peers if p.rag is not None]


def _tuned_peers(project: Project, model: ModelUnderTest, plan: Plan, peers: Sequence[Persona], run: ModelRun,
                 notes: list[str], progress: Progress) -> None:
    """Answers (and Big Five) of each peer's own tuned adapter of the same kind, when it has been trained."""
    from persllm.backends.hf import HFBackend
    from persllm.variants import project_repetition, spec_for

    for peer in (Persona(p.slug, p.project) for p in peers):  # the adapter's training prompt: no retrieval
        try:
            spec = spec_for(peer.project, model.variant)
        except ConfigError as exc:
            notes.append(f"peer {peer.slug}: {exc}")
            continue
        backend = HFBackend(spec.model, adapter=spec.adapter or None, batch_size=project.eval.batch_size,
                            name=f"{peer.slug}/{model.variant}")
        backend.repetition = project_repetition(peer.project, backend.parameters)
        try:
            run.answers += answer_all(model, backend, peer_asks(plan, [peer]), plan.decoding, progress, "peer answers")
            stage = peer.project.stages[-1].id
            run.ipip[f"{peer.slug}/{stage}"] = administer(peer, stage, model, backend, plan, progress)
        finally:
            backend.close()
