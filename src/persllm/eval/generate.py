"""Models under test and their answers: the same prompts (template.prompt_messages), questions and seeds for all.

A local transformers model (base, rag, sft, dpo, hf:...) answers everything in ONE decoding pass: greedy rows and
sampled rows side by side, the prompt prefix they share encoded once; its two sampled answers per question are two
rows of one seeded batch. Other backends (endpoints, llama.cpp) get one request per answer, greedy or sampled, with seed S
for the first sample and S+1 for the second.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

from persllm import template
from persllm import text as T
from persllm.backends import Backend, GenParams
from persllm.config import Project
from persllm.construct.retrieval import Retriever
from persllm.errors import BackendError, ConfigError
from persllm.progress import Progress
from persllm.types import Message, Passage, Sample
from persllm.variants import TUNED, spec_for

if TYPE_CHECKING:
    from persllm.backends.hf import HFBackend

RAG_HEADER = {
    "en": ("What you know (your own records):\n{knowledge}", "How you speak (your own words):\n{style}"),
    "zh": ("你知道的事（你自己的记录）：\n{knowledge}", "你说话的方式（你自己的话）：\n{style}"),
}


@dataclass(frozen=True)
class ModelUnderTest:
    """One model named on the command line."""

    name: str  # base, rag, sft, dpo, or a backend spec such as openai:gpt-4o-mini
    variant: str  # what is loaded: base, sft, dpo, or the spec itself
    spec: str  # human-readable description for the report
    local: bool  # an in-process transformers model: batched sampling and log-likelihoods
    rag: bool = False  # retrieved material goes into the system prompt


@dataclass(frozen=True)
class Ask:
    """One prompt to answer: the persona and stage it is asked as, the question, and what it is for."""

    key: str  # unique per model: purpose/item/stage/sample
    purpose: str  # probe | heldout | sample | other_stage | peer | ipip
    item_id: str
    persona: str
    stage: str
    question: str
    messages: tuple[Message, ...]
    sample: int = 0  # 0 = greedy; 1, 2 = sampled answers
    raw: str = ""  # a plain-text prompt used instead of the chat-rendered messages (few-shot baseline)


@dataclass(frozen=True)
class Answer:
    """What a model said to one Ask (raw text kept; scoring uses `visible`)."""

    model: str
    key: str
    purpose: str
    item_id: str
    persona: str
    stage: str
    question: str
    text: str
    visible: str
    seed: int | None
    temperature: float
    sample: int = 0
    finish: str = "stop"
    error: str = ""


def resolve_models(project: Project, names: Sequence[str]) -> list[ModelUnderTest]:
    """Check every model name before any work starts (missing adapters and bad specs fail here, fast)."""
    if not names:
        raise ConfigError("eval.models is empty; name at least one model, e.g. --models base,sft,dpo")
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.models names a model twice: {', '.join(names)}")
    out = []
    for name in names:
        variant = "base" if name == "rag" else name
        spec = spec_for(project, variant)  # raises ConfigError naming the missing adapter or the bad spec
        local = variant in ("base", *TUNED) or spec.backend == "hf"
        label = f"{spec.model}" + (f" + adapter {spec.adapter}" if spec.adapter else "") if local else spec.spec
        out.append(ModelUnderTest(name, variant, f"{name}: {label}" + (" with retrieval" if name == "rag" else ""),
                                  local=local, rag=name == "rag"))
    return out



class RagIndex:
    """Retrieval over each stage's passages, minus the held-out ones, for the 'rag' baseline's system prompt."""

    def __init__(self, passages: Sequence[Passage], held_out: set[str], budget: int, language: str) -> None:
        stages = sorted({p.stage for p in passages})
        self.retrievers = {s: Retriever([p for p in passages if p.stage == s and p.id not in held_out])
                           for s in stages}
        self.budget = budget
        self.headers = RAG_HEADER.get(language, RAG_HEADER["en"])

    def block(self, stage: str, question: str) -> str:
        """Knowledge (three quarters of the budget) and style passages most relevant to the question."""
        retriever = self.retrievers.get(stage)
        if retriever is None:
            return ""
        knowledge, style = relevant_material(retriever, question, self.budget)
        return "\n\n".join(h.format(knowledge=knowledge, style=style).strip()
                           for h, part in zip(self.headers, (knowledge, style)) if part)


def relevant_material(retriever: Retriever, question: str, budget: int) -> tuple[str, str]:
    """(knowledge, own words) most relevant to the question: three quarters of the token budget, then a quarter."""
    if not retriever.passages:
        return "", ""
    ranked = retriever.rank(question)  # one BM25 pass serves both kinds
    return (_fill([p for p in ranked if p.kind == "knowledge"], budget * 3 // 4),
            _fill([p for p in ranked if p.kind == "style"], budget // 4))


def _fill(ranked: Sequence[Passage], budget: int) -> str:
    """Passages in rank order until the budget is spent; one passage longer than the budget is cut, never dropped."""
    chosen: list[str] = []
    used = 0
    for passage in ranked:
        cost = T.count_tokens(passage.text)
        if used + cost > budget:
            if not chosen:
                chosen.append(T.truncate_tokens(passage.text, budget))
            break
        chosen.append(passage.text)
        used += cost
    return "\n".join(chosen)


def persona_messages(project: Project, stage: str, question: str, rag: RagIndex | None = None) -> tuple[Message, ...]:
    """The persona prompt for one question: exactly the training template, plus retrieved material for 'rag'."""
    messages = template.prompt_messages(template.context_for(project, stage), question)
    if rag is not None:
        block = rag.block(stage, question)
        if block:
            messages[0] = Message("system", f"{messages[0].content}\n\n{block}")
    return tuple(messages)


class FewShotForm(TypedDict):
    """One language's few-shot transcript: its header, the question prefix, and where an answer ends."""

    header: str
    question: str
    ends: tuple[str, ...]


FEW_SHOT: dict[str, FewShotForm] = {
    "en": {"header": "Below, {name} answers questions in {pronoun} own words, as in {label}.", "question": "Question: ",
           "ends": ("\nQuestion:", "\n\n")},
    "zh": {"header": "下面是{name}在{label}用自己的话回答问题。", "question": "问：", "ends": ("\n问：", "\n\n")},
}
FEW_SHOT_EXAMPLES = 3


def few_shot_examples(samples: Sequence[Sample], stage: str, k: int = FEW_SHOT_EXAMPLES) -> list[Sample]:
    """Short training-split answers of one stage, one kind after another (ordinary, opinion, induced)."""
    pool = [s for s in samples if s.split == "train" and s.stage == stage and s.kind != "general" and s.response]
    by_kind = {kind: sorted((s for s in pool if s.kind == kind), key=lambda s: (T.count_tokens(s.response), s.id))
               for kind in ("ordinary", "opinion", "induced")}
    chosen: list[Sample] = []
    while len(chosen) < k and any(by_kind.values()):
        for queue in by_kind.values():
            if queue and len(chosen) < k:
                chosen.append(queue.pop(0))
    return chosen


@dataclass(frozen=True)
class FewShot:
    """The few-shot prompting of a base model without a chat template: examples per stage from the training split."""

    examples: dict[str, list[Sample]]
    pronoun: str = "they"  # how the material refers to the persona: she, he or they

    def describe(self) -> str:
        """How the baseline was prompted, for the report."""
        counts = sorted({len(v) for v in self.examples.values()})
        shown = "/".join(map(str, counts)) if counts else "0"
        return (f"few-shot: a plain-text, in-character transcript with {shown} training-split answer(s) per stage "
                "(the base model has no chat template of its own); the IPIP inventory is still asked through the chat "
                "prompt")


def few_shot_prompt(project: Project, stage: str, question: str, shots: FewShot, rag: RagIndex | None = None) -> str:
    """A plain-text, in-character transcript a base model can continue: header, examples, then the question."""
    lang = project.language if project.language in FEW_SHOT else "en"
    form = FEW_SHOT[lang]
    st = project.stage(stage)
    examples = shots.examples.get(stage, [])
    pronoun = {"she": "her", "he": "his"}.get(shots.pronoun, "their")
    lines = [form["header"].format(name=project.name, label=T.time_phrase(st.label, lang), pronoun=pronoun)]
    if st.description.strip():
        lines.append(st.description.strip())
    block = rag.block(stage, question) if rag is not None else ""
    parts = ["\n".join(lines)] + ([block] if block else [])
    colon = "：" if lang == "zh" else ": "
    parts += [f"{form['question']}{s.question.strip()}\n{project.name}{colon}{s.response.strip()}" for s in examples]
    parts.append(f"{form['question']}{question.strip()}\n{project.name}{colon}".rstrip())
    return "\n\n".join(parts)


_SPEAKER = re.compile(r"\n\s*[^\n:：]{1,40}[:：]")  # "\nAda Lovelace:" -- the model writing the next turn itself


def cut_few_shot(text: str, language: str) -> tuple[str, bool]:
    """The answer a few-shot continuation gives, cut where it starts the next question or turn; (text, cut)."""
    form = FEW_SHOT.get(language, FEW_SHOT["en"])
    ends = [i for i in (text.find(e) for e in form["ends"]) if i >= 0]
    speaker = _SPEAKER.search(text)
    if speaker:
        ends.append(speaker.start())
    return (text[: min(ends)].strip(), True) if ends else (text.strip(), False)


@dataclass(frozen=True)
class Decoding:
    """How answers are generated: greedy for sample 0, `temperature` for samples 1 and 2, all seeded."""

    max_tokens: int
    temperature: float
    seed: int
    prefix: str = ""  # forced start of local models' answers ("[Response]" skips the analysis)
    language: str = "en"  # where a few-shot answer ends ("Question:" or "问：")

    def params(self, sample: int) -> GenParams:
        """Sampling settings of one answer (other backends: seed S for sample 1, S+1 for sample 2)."""
        temperature = 0.0 if sample == 0 else self.temperature
        return GenParams(temperature=temperature, max_tokens=self.max_tokens, seed=self.seed + max(0, sample - 1))


def answer_all(model: ModelUnderTest, backend: Backend, asks: Sequence[Ask], decoding: Decoding,
               progress: Progress, description: str) -> list[Answer]:
    """Answers to every ask: one decoding pass for a local model, else one request per ask."""
    if not asks:
        return []
    with progress.task(f"{description} ({model.name})", total=len(asks)) as task:
        if model.local:
            return _answer_local(model, as_local(backend), asks, decoding, task.advance)
        out: list[Answer] = []
        for sample in sorted({a.sample for a in asks}):
            group = [a for a in asks if a.sample == sample]
            out.extend(_answer_group(model, backend, group, decoding.params(sample), task.advance))
    order = {a.key: i for i, a in enumerate(asks)}
    return sorted(out, key=lambda a: order[a.key])


def _answer_local(model: ModelUnderTest, hf: HFBackend, asks: Sequence[Ask], decoding: Decoding,
                  advance: Callable[[int], None]) -> list[Answer]:
    """Greedy and sampled rows together in one batched decoding pass (both samples: rows of one seeded batch).

    One pass beats one per stage: on 2 CPU cores decoding 24 rows costs little more per step than 12, while each
    extra pass pays every step again (measured: 24 rows x 12 tokens, 6.9 s in one pass, 6.2 s in two, and the gap
    turns the other way from ~20 tokens on).
    """
    requests = [a.raw or hf.render(list(a.messages)) + decoding.prefix for a in asks]
    temperatures = [decoding.params(a.sample).temperature for a in asks]
    completions = hf.generate_rows(requests, temperatures, decoding.max_tokens, seed=decoding.seed)
    advance(len(asks))
    out = []
    for a, c, t in zip(asks, completions, temperatures):
        if a.raw:  # few-shot: the answer ends where the model starts the next "Question:"
            text, cut = cut_few_shot(c.text, decoding.language)
            out.append(_answer(model, a, text, "stop" if cut else c.finish_reason, "", decoding.seed, t))
        else:
            out.append(_answer(model, a, decoding.prefix + c.text, c.finish_reason, "", decoding.seed, t))
    return out


def _answer_group(model: ModelUnderTest, backend: Backend, asks: Sequence[Ask], params: GenParams,
                  advance: Callable[[int], None]) -> list[Answer]:
    results: dict[int, Answer] = {}
    for index, result in backend.complete_many([list(a.messages) for a in asks], params):
        if isinstance(result, BackendError):
            results[index] = _answer(model, asks[index], "", "error", str(result), params.seed, params.temperature)
        else:
            results[index] = _answer(model, asks[index], result.text, result.finish_reason, "", params.seed,
                                     params.temperature)
        advance(1)
    return [results[i] for i in range(len(asks))]


def _answer(model: ModelUnderTest, ask: Ask, text: str, finish: str, error: str, seed: int | None,
            temperature: float) -> Answer:
    return Answer(model.name, ask.key, ask.purpose, ask.item_id, ask.persona, ask.stage, ask.question, text,
                  template.visible_answer(text) if text else "", seed, temperature, ask.sample, finish, error)


def as_local(backend: Backend) -> HFBackend:
    """The backend as the local transformers model it is (log-likelihoods, batched decoding)."""
    from persllm.backends.hf import HFBackend

    if not isinstance(backend, HFBackend):  # internal invariant: only models resolved as local get here
        raise TypeError(f"{backend.name} is not a local transformers model")
    return backend
