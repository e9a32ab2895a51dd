"""Grounded construction for a weak offline teacher (the default with the embedded 270M base model).

A 270M base model invents facts and cannot follow instructions, so here it only does what it can do reliably
when strictly checked: continue a few-shot pattern to (a) rewrite one biography sentence in the first person and
(b) propose a short question about a passage. Each output must pass validation (facts, names and numbers kept,
first person, no third-person leftovers); otherwise a deterministic rule does the job. Answers are assembled from
the persona's own material: a first-person fact from the knowledge files and the persona's own words from the
style files, with an analysis that checks the premise against that material. Every part records its origin.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from persllm import text as T
from persllm.backends.base import Completion, GenParams
from persllm.config import Project
from persllm.construct import facts as F
from persllm.construct.jobs import Failed, Job, Runner
from persllm.construct.plan import Slot
from persllm.construct.records import Answer, Draft, GeneralItem, Question
from persllm.construct.retrieval import Context, Retriever
from persllm.construct.validate import Reject
from persllm.data import anachronisms
from persllm.prompts import Prompts, fill
from persllm.types import Passage, stable_id

_ASK_MODEL_KINDS = ("ordinary",)


@dataclass(frozen=True)
class Fact:
    """A knowledge sentence in the third person and how it reads in the first person."""

    third: str
    first: str
    origin: str  # "teacher_rewrite", "rule_rewrite" or "verbatim" (no reference to the persona)


class GroundedMethod:
    """Builds questions and answers from the persona's own material, using the teacher for short rewrites."""

    name = "grounded"

    def __init__(self, project: Project, prompts: Prompts, runner: Runner, ref: F.PersonaRef,
                 retrievers: dict[str, Retriever]) -> None:
        self.project = project
        self.prompts = prompts
        self.runner = runner
        self.ref = ref
        self.retrievers = retrievers
        self.lang = project.language
        self.joiner = "" if self.lang == "zh" else " "
        self.entity_pool = {s: _entity_pool(r.passages, ref) for s, r in retrievers.items()}
        self.material_words = {w for r in retrievers.values() for p in r.passages for w in T.content_words(p.text)}
        self.rewrites: dict[str, Fact] = {}

    # -- questions ------------------------------------------------------------------------------------------
    def questions(self, slots: Sequence[Slot]) -> dict[str, Question | Failed]:
        """Model-proposed questions where they pass strict checks, template questions otherwise."""
        jobs, by_key = [], {}
        for slot in slots:
            if slot.kind not in _ASK_MODEL_KINDS:
                continue
            prompt = self.prompts.fill("grounded.question_fewshot", name=self.project.name, passage=slot.seed.text)
            key = f"gq:{slot.id}:{stable_id(prompt, length=12)}"
            by_key[key] = slot
            jobs.append(Job(key, prompt, self._question_check(slot), self._short_params(slot.id)))
        proposed = self.runner.run("questions (small model)", jobs) if jobs else {}
        out: dict[str, Question | Failed] = {}
        model = {by_key[k].id: v for k, v in proposed.items()}
        for slot in slots:
            result = model.get(slot.id)
            out[slot.id] = result if isinstance(result, Question) else self._template_question(slot)
        return out

    def _question_check(self, slot: Slot) -> Any:
        seed_words = set(T.content_words(slot.seed.text))
        seed_caps = set(_capitalised(slot.seed.text))
        seed_numbers = set(re.findall(r"\d+", slot.seed.text))

        def check(completion: Completion) -> Question:
            text = completion.text.strip().split("\n")[0].strip().strip("\"'“”")
            if not text:
                raise Reject("empty")
            if not text.endswith(("?", "？")) or text.count("?") + text.count("？") != 1:
                raise Reject("not_one_question")
            n = T.count_tokens(text)
            if not 4 <= n <= 30:
                raise Reject("length", f"{n} tokens")
            if not re.search(r"\b(you|your)\b", text, re.IGNORECASE) and "你" not in text:
                raise Reject("not_addressed_to_persona")
            if F.mentions_persona(text, self.ref):
                raise Reject("third_person_persona")
            words = set(T.content_words(text))
            if not words & seed_words:
                raise Reject("off_topic")
            if set(_capitalised(text)) - seed_caps - {text.split()[0] if text.split() else ""}:
                raise Reject("invented_name")
            if set(re.findall(r"\d+", text)) - seed_numbers:
                raise Reject("invented_number")
            return Question(text, origin="teacher")

        return check

    def _template_question(self, slot: Slot) -> Question:
        rng = random.Random(stable_id(self.project.seed, slot.id))
        if slot.kind == "opinion":
            text = self._fill_choice(f"grounded.opinion.{slot.variant}", rng, topic=self._topic(slot.seed, rng))
            return Question(text, "template", {"stance": slot.variant})
        if slot.kind == "induced":
            return self._induced_question(slot, rng)
        seed_years = F.years(slot.seed.text)
        if seed_years and rng.random() < 0.3:
            return Question(self._fill_choice("grounded.ordinary_year", rng, year=rng.choice(seed_years)), "template")
        return Question(self._fill_choice("grounded.ordinary", rng, topic=self._topic(slot.seed, rng)), "template")

    def _induced_question(self, slot: Slot, rng: random.Random) -> Question:
        order = [slot.variant] + [v for v in ("wrong_fact", "after_time", "never_lived", "identity")
                                  if v != slot.variant]
        for variant in order:
            built = getattr(self, f"_induced_{variant}")(slot, rng)
            if built is not None:
                return built
        raise AssertionError("identity questions can always be built")

    def _induced_wrong_fact(self, slot: Slot, rng: random.Random) -> Question | None:
        if slot.seed.kind != "knowledge":
            return None
        others = self.entity_pool.get(slot.stage, [])
        for sentence in rng.sample(T.sentences(slot.seed.text), k=len(T.sentences(slot.seed.text))):
            premise = F.perturb(sentence, self.ref, others, rng)
            if premise is None:
                continue
            false_you = F.lower_first(F.convert_person(premise.false_sentence, self.ref, "second")).rstrip(".。")
            text = self._fill_choice("grounded.induced.wrong_fact", rng, false=false_you)
            meta = {"premise": "wrong_fact", "truth": premise.truth, "false_value": premise.false_value,
                    "true_sentence": premise.true_sentence, "false_sentence": premise.false_sentence}
            return Question(text, "template", meta)
        return None

    def _induced_after_time(self, slot: Slot, rng: random.Random) -> Question | None:
        year = F.label_year(self.project.stage(slot.stage).label)
        if year is None:
            return None
        later = [a for a in anachronisms() if a["year"] > year]
        if not later:
            return None
        thing = rng.choice(later)
        name = thing[self.lang if self.lang in thing else "en"]
        text = self._fill_choice("grounded.induced.after_time", rng, thing=name)
        return Question(text, "template", {"premise": "after_time", "thing": name, "year": thing["year"]})

    def _induced_never_lived(self, slot: Slot, rng: random.Random) -> Question | None:
        events = [e for e in self.prompts.get("grounded.never_lived")
                  if not set(T.content_words(e["event"])) & self.material_words]
        if not events:
            return None
        event = rng.choice(events)
        text = self._fill_choice("grounded.induced.never_lived", rng, **event)
        return Question(text, "template", {"premise": "never_lived", **event})

    def _induced_identity(self, slot: Slot, rng: random.Random) -> Question:
        return Question(self._fill_choice("grounded.induced.identity", rng), "template", {"premise": "identity"})

    def _topic(self, seed: Passage, rng: random.Random) -> str:
        names = F.entities(seed.text, self.ref)
        if names:
            name = rng.choice(names[:4])
            return f"the {name}" if self.lang == "en" and re.search(r"\bthe " + re.escape(name), seed.text) else name
        words = F.topic_words(seed.text, self.retrievers[seed.stage].idf, self.lang)
        return rng.choice(words) if words else ("那段日子" if self.lang == "zh" else "those days")

    # -- answers --------------------------------------------------------------------------------------------
    def answers(self, drafts: Sequence[Draft]) -> dict[str, Answer | Failed]:
        """Golden answers assembled from the stage's own material."""
        self._prepare_facts([self._fact_sentence(d.slot.stage, d.question, d.context, d.slot.seed) for d in drafts])
        return {d.slot.id: self._compose(d.slot, d.slot.stage, d.question, d.context) for d in drafts}

    def negatives(self, drafts: Sequence[Draft], other: dict[str, tuple[str, Context]],
                  types: Sequence[str]) -> dict[tuple[str, str], Answer | Failed]:
        """Other-stage answers (same rules, other stage's material), generic-assistant and premise-accepting ones."""
        if "other_stage" in types:
            self._prepare_facts([self._fact_sentence(stage, d.question, ctx, None)
                                 for d in drafts if d.slot.id in other for stage, ctx in [other[d.slot.id]]])
        out: dict[tuple[str, str], Answer | Failed] = {}
        for draft in drafts:
            sid = draft.slot.id
            rng = random.Random(stable_id(self.project.seed, sid, "negative"))
            if "other_stage" in types and sid in other:
                stage, context = other[sid]
                out[(sid, "other_stage")] = self._compose(draft.slot, stage, draft.question, context)
            if "non_personified" in types:
                fact = self._fact_sentence(draft.slot.stage, draft.question, draft.context, draft.slot.seed)
                text = self._fill_choice("grounded.non_personified", rng, fact=fact)
                out[(sid, "non_personified")] = Answer("", text, "template")
            if "induced" in types and draft.slot.kind == "induced":
                out[(sid, "induced")] = Answer("", self._accept_premise(draft.question, rng), "template")
        return out

    def _compose(self, slot: Slot, stage_id: str, question: Question, context: Context) -> Answer:
        stage = self.project.stage(stage_id)
        rng = random.Random(stable_id(self.project.seed, slot.id, stage_id))
        premise = question.meta.get("premise", "")
        third = question.meta.get("true_sentence") if premise == "wrong_fact" else None
        third = third or self._fact_sentence(stage_id, question, context, slot.seed if slot.stage == stage_id else None)
        fact = self.rewrites.get(third) or Fact(third, third, "verbatim")
        style = self._style_sentences(question.text + " " + third, context, slot.seed, limit=2)
        names = {"name": self.project.name, "label": stage.label, "question": question.text}
        analysis = self._analysis(slot.kind, question, names, third)
        response = self._response(slot.kind, question, names, fact.first, style, rng)
        meta = {"fact_origin": fact.origin, "style_sentences": len(style)}
        return Answer(analysis, response, "grounded", meta)

    def _analysis(self, kind: str, question: Question, names: dict[str, str], third: str) -> str:
        a = "grounded.analysis."
        parts = [self.prompts.fill(a + ("say" if kind == "opinion" else "ask"), **names)]
        premise = question.meta.get("premise")
        if premise == "wrong_fact":
            parts.append(self.prompts.fill(a + "wrong_fact", **names, truth=question.meta["truth"],
                                           false_value=question.meta["false_value"]))
        elif premise == "after_time":
            parts.append(self.prompts.fill(a + "after_time", **names, thing=question.meta["thing"]))
        elif premise == "never_lived":
            parts.append(self.prompts.fill(a + "never_lived", **names, event=question.meta["event"]))
        elif premise == "identity":
            parts.append(self.prompts.fill(a + "identity", **names))
        else:
            parts.append(self.prompts.fill(a + "premise_ok", **names))
        if premise not in ("after_time", "identity"):  # a random fact would only distract from the refusal
            parts.append(self.prompts.fill(a + "fact", **names, fact=T.truncate_tokens(third, 30)))
        conclusion = question.meta.get("stance") or ("correct" if premise else "ordinary")
        parts.append(self.prompts.fill(a + conclusion, **names))
        # Kept short on purpose: a small model pays for every analysis token before it reaches the response.
        return self.joiner.join(p for p in parts if p)

    def _response(self, kind: str, question: Question, names: dict[str, str], fact: str, style: list[str],
                  rng: random.Random) -> str:
        r = "grounded.response."
        premise = question.meta.get("premise")
        voice = self.joiner.join(style)
        if kind == "opinion":  # the stance, the fact the opinion is about, then the persona's own words
            parts = [self._fill_choice(r + question.meta["stance"], rng, **names), fact, style[0] if style else ""]
        elif premise == "wrong_fact":
            parts = [self._fill_choice(r + "wrong_fact", rng, **names), fact]
        elif premise == "after_time":
            thing = question.meta["thing"]
            parts = [self._fill_choice(r + "after_time", rng, **names, thing=thing),
                     self.prompts.fill(r + "after_time_tail", **names), style[0] if style else ""]
        elif premise == "never_lived":
            deny = question.meta["deny"] + ("。" if self.lang == "zh" else ".")
            parts = [self._fill_choice(r + "never_lived", rng, **names), deny, fact]
        elif premise == "identity":
            parts = [self._fill_choice(r + "identity", rng, **names), fact, style[0] if style else ""]
        else:
            parts = [fact, voice]
        return self.joiner.join(p.strip() for p in parts if p and p.strip())

    def _accept_premise(self, question: Question, rng: random.Random) -> str:
        premise = question.meta.get("premise", "identity")
        values: dict[str, str] = {}
        if premise == "wrong_fact":
            values["false"] = F.convert_person(question.meta["false_sentence"], self.ref, "first")
        elif premise == "after_time":
            values["thing"] = question.meta["thing"]
        elif premise == "never_lived":
            values["event"] = question.meta["event"]
        return self._fill_choice(f"grounded.accept.{premise}", rng, **values)

    # -- facts and style ------------------------------------------------------------------------------------
    def _fact_sentence(self, stage_id: str, question: Question, context: Context, seed: Passage | None) -> str:
        """The knowledge sentence that best answers the question (seed sentences first on ties)."""
        retriever = self.retrievers[stage_id]
        passages = [retriever.by_id[i] for i in context.knowledge_ids if i in retriever.by_id]
        if seed is not None and seed.kind == "knowledge" and seed not in passages:
            passages.insert(0, seed)
        if not passages:
            passages = retriever.rank(question.text, "knowledge")[:3]
        query = set(T.content_words(question.text))
        best, best_score = "", -1.0
        for rank, passage in enumerate(passages):
            for position, sentence in enumerate(T.sentences(passage.text)):
                overlap = len(query & set(T.content_words(sentence)))
                score = overlap - 0.01 * rank - 0.001 * position + (0.5 if seed is not None and passage == seed else 0)
                if score > best_score:
                    best, best_score = sentence, score
        return best

    def _style_sentences(self, query: str, context: Context, seed: Passage, limit: int) -> list[str]:
        """The persona's own sentences most related to the query, taken from the retrieved style context."""
        texts = [seed.text] if seed.kind == "style" else []
        texts += [p for p in context.style.split(" ... ") if p] if context.style else []
        words = set(T.content_words(query))
        scored = []
        for order, passage in enumerate(texts):
            for position, sentence in enumerate(T.sentences(passage)):
                if T.count_tokens(sentence) > 70 or not F.first_person_markers(sentence, self.lang) and order > 0:
                    continue
                bonus = 1.0 if order == 0 and seed.kind == "style" else 0.0
                scored.append((len(words & set(T.content_words(sentence))) + bonus, -order, -position, sentence))
        scored.sort(reverse=True)
        chosen: list[str] = []
        for *_, sentence in scored:  # the seed passage is also in the context: never say the same thing twice
            if sentence not in chosen:
                chosen.append(sentence)
            if len(chosen) == limit:
                break
        return chosen

    def _prepare_facts(self, sentences: Sequence[str]) -> None:
        """First-person versions of knowledge sentences: model rewrite if it passes checks, else the rules."""
        todo = sorted({s for s in sentences if s and s not in self.rewrites})
        needs = [s for s in todo if F.mentions_persona(s, self.ref)]
        for s in todo:
            if s not in needs:
                self.rewrites[s] = Fact(s, s, "verbatim")
        jobs = []
        for sentence in needs:
            prompt = self.prompts.fill("grounded.rewrite_fewshot", name=self.project.name, sentence=sentence)
            jobs.append(Job(f"gr:{stable_id(prompt, length=16)}", prompt, self._rewrite_check(sentence),
                            self._short_params(sentence)))
        results = self.runner.run("first-person rewrites (small model)", jobs) if jobs else {}
        for sentence, job in zip(needs, jobs):
            value = results.get(job.key)
            if isinstance(value, str):
                self.rewrites[sentence] = Fact(sentence, value, "teacher_rewrite")
            else:
                self.rewrites[sentence] = Fact(sentence, F.convert_person(sentence, self.ref), "rule_rewrite")

    def _rewrite_check(self, source: str) -> Any:
        caps = set(_capitalised(source))
        numbers = sorted(re.findall(r"\d+", source))
        n_source = T.count_tokens(source)

        def check(completion: Completion) -> str:
            text = completion.text.strip().split("\n")[0].strip()
            if not text:
                raise Reject("empty")
            if not F.first_person_markers(text, self.lang):
                raise Reject("not_first_person")
            if F.mentions_persona(text, self.ref):
                raise Reject("third_person_left")
            if sorted(re.findall(r"\d+", text)) != numbers:
                raise Reject("numbers_changed")
            if set(_capitalised(text)) - caps - {"I", "My", "Me"}:
                raise Reject("invented_name")
            if not 0.7 <= T.count_tokens(text) / max(1, n_source) <= 1.3:
                raise Reject("length_changed")
            if set(T.content_words(source)) - set(T.content_words(text)) - _PRONOUN_WORDS - set(
                    w.lower() for a in self.ref.aliases for w in a.split()):
                raise Reject("fact_dropped")
            return text

        return check

    # -- general data ---------------------------------------------------------------------------------------
    def general(self, items: Sequence[GeneralItem]) -> dict[str, Answer | Failed]:
        """Answer a general request in character when the persona could know it, refuse in character otherwise."""
        out: dict[str, Answer | Failed] = {}
        for item in items:
            stage = self.project.stage(item.stage)
            rng = random.Random(stable_id(self.project.seed, item.id))
            year = F.label_year(stage.label)
            names = {"name": self.project.name, "label": stage.label, "question": item.instruction}
            knowable = year is None or item.known_since is None or item.known_since <= year
            analysis = []
            if knowable:
                analysis.append(self.prompts.fill("grounded.analysis.premise_ok", **names))
                analysis.append(self.prompts.fill("grounded.analysis.ordinary", **names))
                lead = self._fill_choice("grounded.general_lead", rng, **names)
                response = self.joiner.join(p for p in (lead, item.reference) if p)
            else:
                analysis.append(self.prompts.fill("grounded.analysis.after_time", **names,
                                                  thing=_shorten(item.instruction)))
                response = self._fill_choice("grounded.refuse_general", rng, **names)
            out[item.id] = Answer(self.joiner.join(analysis), response, "grounded",
                                  {"knowable": knowable, "known_since": item.known_since})
        return out

    # -- helpers --------------------------------------------------------------------------------------------
    def _fill_choice(self, key: str, rng: random.Random, **values: Any) -> str:
        options = self.prompts.get(key)
        return fill(rng.choice(options) if isinstance(options, list) else options, **values).strip()

    def _short_params(self, salt: str) -> GenParams:
        seed = int(stable_id(self.project.seed, salt, length=8), 16) % 1_000_000
        return GenParams(temperature=0.7, max_tokens=64, top_p=0.95, stop=("\n",), seed=seed)


_PRONOUN_WORDS = {"she", "her", "hers", "herself", "he", "him", "his", "himself"}


def _capitalised(text: str) -> list[str]:
    """Capitalised words not at a sentence start."""
    words = re.findall(r"(?<=[a-z,;:] )([A-Z][\w'’\-]*)", text)
    return [re.sub(r"['’]s$", "", w) for w in words]


def _entity_pool(passages: Sequence[Passage], ref: F.PersonaRef) -> list[str]:
    pool: list[str] = []
    for passage in passages:
        if passage.kind == "knowledge":
            pool.extend(F.entities(passage.text, ref))
    return sorted(set(pool))


def _shorten(text: str, limit: int = 12) -> str:
    toks = T.tokens(text)
    return text if len(toks) <= limit else " ".join(toks[:limit]) + " ..."

