"""Grounded construction for a weak offline teacher (the default with the embedded 270M base model).

A 270M base model invents facts and cannot follow instructions, so here it only proposes short questions about a
passage and rescues first-person rewrites that the rules could not do, and each of its outputs must pass strict
checks. Everything else comes from the persona's own material:

- ordinary questions ask about a named person, thing or year of a seed sentence, and the answer is that sentence
  in the first person plus the persona's own words where they bear on the question;
- opinion items start from a view the persona states (`views.py`): the user agrees with it, doubts it or
  contradicts it, and the persona answers from that relation in their own words;
- induced questions carry a false premise (a changed fact, a later invention, a life never lived, an event long
  before the persona was born, an attack on the persona's identity) that the analysis names and the answer
  corrects.

Every sample must pass the checks of `quality.py` while it is built (grammatical rewrites, an answer that takes up
the question, no sentence reused beyond a few responses); where no such sample can be built for a slot, none is,
and the slot is counted as dropped with its reason. Every part records its origin.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from persllm import text as T
from persllm.backends.base import Completion, GenParams
from persllm.config import Project
from persllm.construct import facts as F
from persllm.construct import quality as Q
from persllm.construct.jobs import Failed, Job, Runner
from persllm.construct.plan import Slot
from persllm.construct.records import Answer, Draft, GeneralItem, Question
from persllm.construct.retrieval import Context, Retriever
from persllm.construct.validate import Reject
from persllm.construct.views import View, find_views, quotable, second_person, strip_conjunction
from persllm.data import anachronisms, later_terms
from persllm.prompts import Prompts, fill
from persllm.types import CONSTRUCTED_NEGATIVES, Passage, stable_id

_IDENTITY_CUES = re.compile(r"\b(?:born|daughter|son|married|wife|husband|mother|father|studied|became|lived|"
                            r"grew up|only child)\b|出生|生于|女儿|儿子|结婚|妻子|丈夫|母亲|父亲|求学|学习|成为|居住")
_MAX_FACT_TOKENS = 55
_TEACHER_RELEVANCE = 0.5  # share of a model-written question's topic words each answering sentence must take up
_VAGUE_END = re.compile(r"\b(?:it|that|this|them|there|those|these)\s*[?？]$", re.IGNORECASE)

# What an answer builder returns: (analysis parts, response parts, meta), or Failed(reason).
Built = tuple[list[str], list[str], dict[str, Any]] | Failed
# What a negative builder returns for one draft: the rejected answer, Failed(reason), or None (no such negative).
NegativeBuilder = Callable[["GroundedMethod", Draft, dict[str, tuple[str, Context]], random.Random],
                           Answer | Failed | None]


@dataclass(frozen=True)
class Fact:
    """A knowledge sentence in the third person and how the persona says it in the first person."""

    third: str
    first: str
    origin: str  # "teacher_rewrite", "rule_rewrite" or "verbatim" (no reference to the persona)


class GroundedMethod:
    """Builds questions and answers from the persona's own material, using the teacher for short rewrites."""

    name = "grounded"

    def __init__(self, project: Project, prompts: Prompts, runner: Runner, ref: F.PersonaRef,
                 retrievers: dict[str, Retriever], held_out: frozenset[str] = frozenset()) -> None:
        self.project = project
        self.prompts = prompts
        self.runner = runner
        self.ref = ref
        self.retrievers = retrievers
        self.held_out = held_out
        self.lang = project.language
        self.joiner = "" if self.lang == "zh" else " "
        self.entity_pool = {s: _entity_pool(r.passages, ref) for s, r in retrievers.items()}
        self.material = " ".join(p.text for r in retrievers.values() for p in r.passages)
        self.views = {s: find_views(r.passages, ref) for s, r in retrievers.items()}
        self.view_uses: dict[str, int] = {}
        self.rewrites: dict[str, Fact | None] = {}
        self.budget = Q.SentenceBudget()  # shared by every personified and general response
        self.wording_uses: Counter[tuple[str, str]] = Counter()

    # -- questions ------------------------------------------------------------------------------------------
    def questions(self, slots: Sequence[Slot]) -> dict[str, Question | Failed]:
        """Model-proposed ordinary questions where they pass strict checks, questions built by rules otherwise."""
        jobs, by_key = [], {}
        for slot in slots:
            if slot.kind != "ordinary":
                continue
            prompt = self.prompts.fill("grounded.question_fewshot", name=self.project.name, passage=slot.seed.text)
            key = f"gq:{slot.id}:{stable_id(prompt, length=12)}"
            by_key[key] = slot
            jobs.append(Job(key, prompt, self._question_check(slot), self._short_params(slot.id)))
        proposed = self.runner.run("questions (small model)", jobs) if jobs else {}
        model = {by_key[k].id: v for k, v in proposed.items()}
        out: dict[str, Question | Failed] = {}
        for slot in slots:
            result = model.get(slot.id)
            out[slot.id] = result if isinstance(result, Question) else self._rule_question(slot)
        return out

    def _question_check(self, slot: Slot) -> Callable[[Completion], Question]:
        seed_words = set(T.content_words(slot.seed.text))
        seed_caps = set(_capitalised(slot.seed.text))
        seed_numbers = set(re.findall(r"\d+", slot.seed.text))
        seed_sentences = T.sentences(slot.seed.text)

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
            if _VAGUE_END.search(text):
                raise Reject("vague")  # "How did you feel when you first saw it?": saw what?
            if not set(T.content_words(text)) & seed_words:
                raise Reject("off_topic")
            if not any(self._takes_up(text, s) for s in seed_sentences):
                raise Reject("unanswerable")  # no seed sentence takes it up: the rules ask their own question instead
            if set(_capitalised(text)) - seed_caps - {text.split()[0] if text.split() else ""}:
                raise Reject("invented_name")
            if set(re.findall(r"\d+", text)) - seed_numbers:
                raise Reject("invented_number")
            if Q.person_errors(text, self.lang):
                raise Reject("ungrammatical")
            return Question(text, origin="teacher")

        return check

    def _rule_question(self, slot: Slot) -> Question | Failed:
        rng = random.Random(stable_id(self.project.seed, slot.id))
        if slot.kind == "opinion":
            return self._opinion_question(slot, rng)
        if slot.kind == "induced":
            return self._induced_question(slot, rng)
        return self._ordinary_question(slot, rng)

    def _ordinary_question(self, slot: Slot, rng: random.Random) -> Question | Failed:
        """A question about a person, thing or year named in one seed sentence, which that sentence answers."""
        options = []
        for sentence in T.sentences(slot.seed.text):
            if not _self_contained(sentence, slot.seed):
                continue
            names = [e for e in F.entities(sentence, self.ref) if self._is_topic(e, sentence)]
            options += [("thing", e, sentence) for e in names[:2]]
            if F.mentions_persona(sentence, self.ref) or slot.seed.kind == "style":  # "what happened to you"
                options += [("year", y, sentence) for y in F.years(sentence)[:1]]
        if not options:
            return Failed("no_topic")
        kind, topic, sentence = rng.choice(options)
        if kind == "thing" and self.lang == "en" and (any(w in F.TITLES for w in topic.split()) or F.RELATIONS.search(
                sentence[: sentence.find(topic)]) or F.entity_kind(topic, self.material) == "person"):
            kind = "person"  # "What sort of person was Babbage?", never "What was Babbage about?"
        shown = f"the {topic}" if self.lang == "en" and re.search(r"\bthe " + re.escape(topic), self.material) else topic
        key = "year" if kind == "year" else kind
        text = self._fill_choice(f"grounded.ordinary.{key}", rng, topic=shown, year=topic)
        return Question(text, "template", {"topic": topic, "source": sentence})

    def _is_topic(self, entity: str, sentence: str) -> bool:
        """A named person or thing worth asking about: not the persona's own name or title, not a form of address
        ("My dear Mamma"), not a name used as an adjective ("the Bernoulli numbers"), not a common word
        capitalised at the start of a sentence ("Mathematics is ...")."""
        surname = self.project.name.split()[-1] if self.lang != "zh" else self.project.name
        if _in(surname, entity) or any(entity == a for a in self.ref.aliases):
            return False
        if self.lang == "en" and " " not in entity and re.search(r"(?:ish|ian|ese|ch)$", entity):
            return False  # a nationality or language used as an adjective ("his Polish sympathies")
        if self.lang == "en":
            at = re.search(r"(\w+\s+)?" + re.escape(entity) + r"(\s+[a-z]+)?", sentence)
            before = (at.group(1) or "").strip().lower() if at else ""
            after = (at.group(2) or "").strip() if at else ""
            if before in ("a", "an") and " " not in entity:
                return False  # a common noun capitalised for a nation ("a Frenchman"), not one named thing
            if before == "dear" or before in ("the", "my", "his", "her", "their", "our", "its") and \
                    " " not in entity and after and after not in T.STOPWORDS_EN and not after.endswith("ed") \
                    and len(after) > 3:
                return False
            if " " not in entity and sentence.startswith(entity) and not F.named_inside(entity, self.material):
                return False  # only ever capitalised because it starts a sentence ("Coming first in ...")
        return " " in entity or self.lang == "zh" or re.search(r"(?<![.!?] )\b" + re.escape(entity.lower()) + r"\b",
                                                               self.material) is None

    def _opinion_question(self, slot: Slot, rng: random.Random) -> Question | Failed:
        """The user agrees with, doubts or contradicts one of the persona's own views on its real topic."""
        view = self._pick_view(slot)
        if view is None:
            return Failed("no_view")
        relation = slot.variant
        if view.proposition:
            # The user states their own position on P: the same as the persona's, a doubt, or the opposite.
            side = {"agree": "holds", "differ": "doubts", "conflict": "rejects"}[relation]
            if view.negated:
                side = {"holds": "rejects_mild", "doubts": "leans", "rejects": "insists"}[side]
            text = self._fill_choice(f"grounded.opinion.direct.{side}", rng, p=view.proposition)
        elif quotable(view.sentence, self.lang):
            text = self._fill_choice(f"grounded.opinion.reported.{relation}", rng,
                                     view=second_person(view.sentence, self.lang, self.material))
        else:
            return Failed("view_not_quotable")
        if Q.person_errors(text, self.lang):
            return Failed("ungrammatical_statement")
        self.view_uses[view.sentence] = self.view_uses.get(view.sentence, 0) + 1
        meta = {"stance": relation, "relation": relation, "view": view.sentence, "view_id": view.passage_id,
                "view_origin": view.origin}
        return Question(text, "template", meta)

    def _pick_view(self, slot: Slot) -> View | None:
        """The least-used view of the stage closest to the seed (the seed's own first), held-out views excluded."""
        views = self.views.get(slot.stage, [])
        if slot.split == "test":  # a held-out item is built from its own held-out seed only
            allowed = [v for v in views if v.passage_id == slot.seed.id]
        else:
            allowed = [v for v in views if v.passage_id not in self.held_out]
        if not allowed:
            return None
        seed_terms = Q.topic_terms(slot.seed.text, self.lang)

        def score(view: View) -> tuple[float, ...]:
            overlap = len(seed_terms & Q.topic_terms(view.sentence, self.lang))
            return (self.view_uses.get(view.sentence, 0), -(view.passage_id == slot.seed.id), -overlap,
                    -bool(view.proposition))

        best = min(allowed, key=score)
        return best if self.view_uses.get(best.sentence, 0) < Q.REUSE_LIMIT else None

    def _induced_question(self, slot: Slot, rng: random.Random) -> Question | Failed:
        order = [slot.variant] + [v for v in ("wrong_fact", "after_time", "never_lived", "before_time", "identity")
                                  if v != slot.variant]
        builders = {"wrong_fact": self._induced_wrong_fact, "after_time": self._induced_after_time,
                    "never_lived": self._induced_never_lived, "before_time": self._induced_before_time,
                    "identity": self._induced_identity}
        for variant in order:
            built = builders[variant](slot, rng)
            if built is not None:
                return built
        return Failed("no_false_premise")

    def _induced_wrong_fact(self, slot: Slot, rng: random.Random) -> Question | None:
        if slot.seed.kind != "knowledge":
            return None
        others = self.entity_pool.get(slot.stage, [])
        sentences = T.sentences(slot.seed.text)
        for sentence in rng.sample(sentences, k=len(sentences)):
            premise = F.perturb(sentence, self.ref, others, rng, self.material)
            if premise is None or T.count_tokens(sentence) > _MAX_FACT_TOKENS:
                continue
            false_you = F.lower_start(F.convert_person(premise.false_sentence, self.ref, "second"), self.material).rstrip(".。")
            if F.mentions_persona(false_you, self.ref) or Q.person_errors(false_you, self.lang):
                continue
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
        text = self._fill_choice(f"grounded.induced.after_time.{thing['kind']}", rng, thing=name)
        return Question(text, "template", {"premise": "after_time", "thing": name, "year": thing["year"]})

    def _induced_never_lived(self, slot: Slot, rng: random.Random) -> Question | None:
        # An event is usable only if nothing in the material mentions its key term (a person may have really
        # travelled to Sweden); the key is one phrase, so a shared character or common word does not count.
        events = [e for e in self.prompts.get("grounded.never_lived") if e["key"].lower() not in self.material.lower()]
        if not events:
            return None
        event = rng.choice(events)
        text = self._fill_choice("grounded.induced.never_lived", rng, **event)
        return Question(text, "template", {"premise": "never_lived", **event})

    def _induced_before_time(self, slot: Slot, rng: random.Random) -> Question | None:
        # Witnessing what happened long before the first stage (TimeChara's past-absence): the persona was not born.
        first = F.label_year(self.project.stages[0].label)
        if first is None:
            return None
        events = [e for e in self.prompts.get("grounded.before_time") if e["year"] <= first - F.LONG_BEFORE_YEARS]
        if not events:
            return None
        event = rng.choice(events)
        text = self._fill_choice("grounded.induced.before_time", rng, thing=event["thing"])
        return Question(text, "template", {"premise": "before_time", "thing": event["thing"], "year": event["year"]})

    def _induced_identity(self, slot: Slot, rng: random.Random) -> Question:
        return Question(self._fill_choice("grounded.induced.identity", rng), "template", {"premise": "identity"})

    # -- answers --------------------------------------------------------------------------------------------
    def answers(self, drafts: Sequence[Draft]) -> dict[str, Answer | Failed]:
        """Golden answers assembled from each stage's own material; Failed(reason) where none passes the checks."""
        self._prepare_facts([s for d in drafts for s in self._fact_candidates(d.slot, d.slot.stage, d.question,
                                                                              d.context)])
        out: dict[str, Answer | Failed] = {}
        for draft in drafts:
            answer = self._compose(draft.slot, draft.slot.stage, draft.question, draft.context, self.budget)
            out[draft.slot.id] = answer
            if isinstance(answer, Answer):
                self.budget.use(answer.response)
        return out

    def negatives(self, drafts: Sequence[Draft], other: dict[str, tuple[str, Context]],
                  types: Sequence[str]) -> dict[tuple[str, str], Answer | Failed]:
        """Other-stage answers (same rules, other stage's material), generic-assistant and premise-accepting ones."""
        if "other_stage" in types:
            self._prepare_facts([s for d in drafts if d.slot.id in other for stage, ctx in [other[d.slot.id]]
                                 for s in self._fact_candidates(d.slot, stage, d.question, ctx)])
        out: dict[tuple[str, str], Answer | Failed] = {}
        for draft in drafts:
            sid = draft.slot.id
            # One generator per draft, drawn from in CONSTRUCTED_NEGATIVES order, so each type's text is reproducible.
            rng = random.Random(stable_id(self.project.seed, sid, "negative"))
            for neg_type in (t for t in CONSTRUCTED_NEGATIVES if t in types):
                built = self.NEGATIVE_BUILDERS[neg_type](self, draft, other, rng)
                if built is not None:
                    out[(sid, neg_type)] = built
        return out

    def _other_stage_negative(self, draft: Draft, other: dict[str, tuple[str, Context]],
                              rng: random.Random) -> Answer | Failed | None:
        if draft.slot.id not in other:
            return None
        stage, context = other[draft.slot.id]
        return self._compose(draft.slot, stage, draft.question, context, None)

    def _non_personified_negative(self, draft: Draft, other: dict[str, tuple[str, Context]],
                                  rng: random.Random) -> Answer:
        fact = self._best_sentence(draft.slot.stage, draft.question, draft.context) or draft.slot.seed.text
        return Answer("", self._fill_choice("grounded.non_personified", rng, fact=fact), "template")

    def _induced_negative(self, draft: Draft, other: dict[str, tuple[str, Context]],
                          rng: random.Random) -> Answer | None:
        if draft.slot.kind != "induced":
            return None
        return Answer("", self._accept_premise(draft.question, rng), "template")

    NEGATIVE_BUILDERS: ClassVar[dict[str, NegativeBuilder]] = {
        "other_stage": _other_stage_negative, "non_personified": _non_personified_negative,
        "induced": _induced_negative}
    """The builder of each constructed negative type (it returns None where a draft cannot have one)."""

    def _compose(self, slot: Slot, stage_id: str, question: Question, context: Context,
                 budget: Q.SentenceBudget | None) -> Answer | Failed:
        """One analysis and response for the question from `stage_id`'s material, or the reason there is none."""
        stage = self.project.stage(stage_id)
        rng = random.Random(stable_id(self.project.seed, slot.id, stage_id))
        names = {"name": self.project.name, "label": T.time_phrase(stage.label, self.lang), "question": question.text}
        premise = question.meta.get("premise", "")
        own_stage = stage_id == slot.stage
        build = {"wrong_fact": self._wrong_fact_answer, "after_time": self._after_time_answer,
                 "never_lived": self._never_lived_answer, "before_time": self._before_time_answer,
                 "identity": self._identity_answer}.get(premise)
        if slot.kind == "opinion":
            built = self._opinion_answer(slot, stage_id, question, names, rng, budget, own_stage)
        elif build is not None:
            built = build(slot, stage_id, question, context, names, rng, budget)
        else:
            built = self._ordinary_answer(slot, stage_id, question, context, names, rng, budget)
        if isinstance(built, Failed):
            return built
        analysis, parts, meta = built
        response = self.joiner.join(p.strip() for p in parts if p and p.strip())
        if Q.person_errors(response, self.lang):
            return Failed("ungrammatical_rewrite")
        if F.mentions_persona(_without_quotes(_without_self_naming(response, self.ref)), self.ref):
            return Failed("third_person_left")
        if slot.kind == "ordinary" and Q.relevance(question.text, response, self.lang,
                                                   self.ref.aliases) < Q.RELEVANCE_THRESHOLD:
            return Failed("low_relevance")
        if budget is not None and not budget.allows(T.sentences(response)):
            return Failed("reuse_limit")
        return Answer(self.joiner.join(a for a in analysis if a), response, "grounded", meta)

    def _ordinary_answer(self, slot: Slot, stage_id: str, question: Question, context: Context,
                         names: dict[str, str], rng: random.Random, budget: Q.SentenceBudget | None) -> Built:
        facts = [f for f in (self.rewrites.get(s) for s in self._fact_candidates(slot, stage_id, question, context))
                 if f is not None]
        facts = _fresh(facts, budget)
        about = question.meta.get("topic") or question.text  # a rule question is about its topic, not its frame
        own = self._own_words(stage_id, about, context, slot, budget, exclude=[f.first for f in facts[:1]])
        if question.origin == "teacher":
            # A model-written question names no topic of ours: each sentence of the answer must take up half of it,
            # or "Why did you choose to become a scientist?" gets a sentence that merely mentions scientists.
            facts = [f for f in facts if self._takes_up(question.text, f.first)]
            own = [w for w in own if self._takes_up(question.text, w)]
        if not facts and not own:
            return Failed("no_fact_for_topic")
        fact = facts[0] if facts else None
        parts = ([fact.first] if fact else []) + own[:1]
        analysis = [self.prompts.fill("grounded.analysis.ask", **names),
                    self.prompts.fill("grounded.analysis.premise_ok", **names)]
        if fact:
            analysis.append(self.prompts.fill("grounded.analysis.fact", **names, fact=fact.third))
        if own:
            analysis.append(self.prompts.fill("grounded.analysis.own_words", **names))
        analysis.append(self.prompts.fill("grounded.analysis.ordinary", **names))
        meta = {"fact_origin": fact.origin if fact else "none", "style_sentences": len(own[:1])}
        return analysis, parts, meta

    def _takes_up(self, question: str, sentence: str) -> bool:
        """True when the sentence shares half of a model-written question's topic words, and two of them when the
        question has two ("When did you become a writer?" is not answered by a sentence about another writer)."""
        asked = Q.topic_terms(question, self.lang, self.ref.aliases)
        shared = asked & Q.topic_terms(sentence, self.lang, self.ref.aliases)
        return bool(asked) and len(shared) >= min(2, len(asked)) and len(shared) / len(asked) >= _TEACHER_RELEVANCE

    def _opinion_answer(self, slot: Slot, stage_id: str, question: Question, names: dict[str, str],
                        rng: random.Random, budget: Q.SentenceBudget | None, own_stage: bool) -> Built:
        view = question.meta["view"]
        relation = question.meta["relation"]
        if not own_stage:
            # Another stage answers from its own views: the one closest to the statement, if it has any.
            candidates = [v for v in self.views.get(stage_id, []) if v.passage_id not in self.held_out]
            if not candidates:
                return Failed("no_view")
            terms = Q.topic_terms(question.text, self.lang)
            view = max(candidates, key=lambda v: len(terms & Q.topic_terms(v.sentence, self.lang))).sentence
        lead = self._fill_choice(f"grounded.response.{relation}", rng, **names)
        first = _join_lead(lead, strip_conjunction(view) if self.lang == "zh" else view, self.lang, self.material)
        parts = [first] + self._continuation(stage_id, view, budget)
        analysis = [self.prompts.fill("grounded.analysis.say", **names),
                    self.prompts.fill("grounded.analysis.view", **names, view=view),
                    self.prompts.fill(f"grounded.analysis.{relation}", **names)]
        return analysis, parts, {"fact_origin": "none", "style_sentences": len(parts)}

    def _wrong_fact_answer(self, slot: Slot, stage_id: str, question: Question, context: Context,
                           names: dict[str, str], rng: random.Random, budget: Q.SentenceBudget | None) -> Built:
        meta = question.meta
        if stage_id == slot.stage:
            third = meta["true_sentence"]
        else:  # another stage corrects from what it knows, which may not include this fact
            third = self._best_sentence(stage_id, question, context)
        fact = self.rewrites.get(third) if third else None
        if fact is None:
            return Failed("no_grammatical_rewrite")
        truth, false_value = meta["truth"], meta["false_value"]
        if truth in F.years(meta["true_sentence"]):  # a changed year reads "不是1921年", not "不是1921"
            truth, false_value = T.time_phrase(truth, self.lang), T.time_phrase(false_value, self.lang)
        lead = self._fill_choice("grounded.response.wrong_fact", rng, **names, false_value=false_value)
        analysis = [self.prompts.fill("grounded.analysis.ask", **names),
                    self.prompts.fill("grounded.analysis.wrong_fact", **names, truth=truth, false_value=false_value),
                    self.prompts.fill("grounded.analysis.fact", **names, fact=fact.third),
                    self.prompts.fill("grounded.analysis.correct", **names)]
        return analysis, [_join_lead(lead, fact.first, self.lang, self.material)], {"fact_origin": fact.origin}

    def _after_time_answer(self, slot: Slot, stage_id: str, question: Question, context: Context,
                           names: dict[str, str], rng: random.Random, budget: Q.SentenceBudget | None) -> Built:
        thing = question.meta["thing"]
        parts = [self._fill_choice("grounded.response.after_time", rng, **names, thing=thing)]
        analysis = [self.prompts.fill("grounded.analysis.ask", **names),
                    self.prompts.fill("grounded.analysis.after_time", **names, thing=thing),
                    self.prompts.fill("grounded.analysis.refuse", **names)]
        return analysis, parts, {"fact_origin": "none"}

    def _never_lived_answer(self, slot: Slot, stage_id: str, question: Question, context: Context,
                            names: dict[str, str], rng: random.Random, budget: Q.SentenceBudget | None) -> Built:
        meta = question.meta
        lead = self._fill_choice("grounded.response.never_lived", rng, **names)
        parts = [_join_lead(lead, meta["deny"] + ("。" if self.lang == "zh" else "."), self.lang)]
        analysis = [self.prompts.fill("grounded.analysis.ask", **names),
                    fill(meta["third"], **names),
                    self.prompts.fill("grounded.analysis.correct", **names)]
        return analysis, parts, {"fact_origin": "none"}

    def _before_time_answer(self, slot: Slot, stage_id: str, question: Question, context: Context,
                            names: dict[str, str], rng: random.Random, budget: Q.SentenceBudget | None) -> Built:
        values = {**names, "thing": question.meta["thing"], "year": question.meta["year"]}
        parts = [self._fill_choice("grounded.response.before_time", rng, **values)]
        analysis = [self.prompts.fill("grounded.analysis.ask", **names),
                    self.prompts.fill("grounded.analysis.before_time", **values),
                    self.prompts.fill("grounded.analysis.correct", **names)]
        return analysis, parts, {"fact_origin": "none"}

    def _identity_answer(self, slot: Slot, stage_id: str, question: Question, context: Context,
                         names: dict[str, str], rng: random.Random, budget: Q.SentenceBudget | None) -> Built:
        facts = _fresh([f for f in (self.rewrites.get(s) for s in self._identity_sentences(stage_id, slot))
                        if f is not None], budget)
        # The persona as the subject ("I married ..."), not a sentence about someone else that mentions them.
        facts = [f for f in facts if re.match(r"^(?:[\w,’'\-]+\s+){0,5}(?:I|my)\b|^我|^\d+年[，,]?我", f.first)]
        lead = self._fill_choice("grounded.response.identity", rng, **names)
        parts = [_join_lead(lead, facts[0].first, self.lang, self.material)] if facts else [_closed(lead, self.lang)]
        analysis = [self.prompts.fill("grounded.analysis.ask", **names),
                    self.prompts.fill("grounded.analysis.identity", **names)]
        if facts:
            analysis.append(self.prompts.fill("grounded.analysis.fact", **names, fact=facts[0].third))
        return analysis, parts, {"fact_origin": facts[0].origin if facts else "none"}

    def _accept_premise(self, question: Question, rng: random.Random) -> str:
        premise = question.meta.get("premise", "identity")
        values: dict[str, str] = {}
        if premise == "wrong_fact":
            values["false"] = F.convert_person(question.meta["false_sentence"], self.ref, "first")
        elif premise in ("after_time", "before_time"):
            values["thing"] = question.meta["thing"]
        elif premise == "never_lived":
            values["event"] = question.meta["event"]
        return self._fill_choice(f"grounded.accept.{premise}", rng, **values)

    # -- facts and the persona's own words ------------------------------------------------------------------
    def _allowed(self, passage: Passage, slot: Slot) -> bool:
        """Training items never draw on held-out passages; a held-out item may use its whole stage."""
        return slot.split == "test" or passage.id not in self.held_out

    def _fact_candidates(self, slot: Slot, stage_id: str, question: Question, context: Context) -> list[str]:
        """Knowledge sentences that could answer the question, best first (the question's own source first)."""
        premise = question.meta.get("premise")
        if premise == "wrong_fact" and stage_id == slot.stage:
            return [question.meta["true_sentence"]]
        if premise == "identity":
            return self._identity_sentences(stage_id, slot)
        if premise or slot.kind == "opinion":
            return []
        source = question.meta.get("source")
        if source and stage_id == slot.stage and slot.seed.kind == "knowledge":
            return [source] + [s for s in self._ranked_sentences(stage_id, question, context, slot) if s != source][:2]
        return self._ranked_sentences(stage_id, question, context, slot)[:3]

    def _ranked_sentences(self, stage_id: str, question: Question, context: Context, slot: Slot) -> list[str]:
        """Knowledge sentences of the context that share topic words with the question, most shared first."""
        retriever = self.retrievers[stage_id]
        passages = [retriever.by_id[i] for i in context.knowledge_ids if i in retriever.by_id]
        if slot.seed.kind == "knowledge" and stage_id == slot.stage and slot.seed not in passages:
            passages.insert(0, slot.seed)
        return self._by_overlap(question.text, passages, lambda p, s: self._allowed(p, slot) and T.count_tokens(s)
                                <= _MAX_FACT_TOKENS and _self_contained(s, p))

    def _best_sentence(self, stage_id: str, question: Question, context: Context) -> str:
        """The context sentence most related to the question (for negatives and other-stage corrections)."""
        retriever = self.retrievers[stage_id]
        passages = [retriever.by_id[i] for i in context.knowledge_ids if i in retriever.by_id]
        ranked = self._by_overlap(question.text, passages, lambda p, s: T.count_tokens(s) <= _MAX_FACT_TOKENS,
                                  least=0)
        return ranked[0] if ranked else ""

    def _by_overlap(self, query: str, passages: Sequence[Passage], keep: Callable[[Passage, str], bool],
                    least: int = 1) -> list[str]:
        """Sentences of the passages that `keep` accepts and that share at least `least` topic words with the query,
        most shared first, then in passage and sentence order."""
        terms = Q.topic_terms(query, self.lang, self.ref.aliases)
        scored = []
        for rank, passage in enumerate(passages):
            for position, sentence in enumerate(T.sentences(passage.text)):
                overlap = len(terms & Q.topic_terms(sentence, self.lang, self.ref.aliases))
                if overlap >= least and keep(passage, sentence):
                    scored.append((-overlap, rank, position, sentence))
        return [s for *_, s in sorted(scored)]

    def _identity_sentences(self, stage_id: str, slot: Slot) -> list[str]:
        """Knowledge sentences that say who the persona is at this stage (birth, family, work)."""
        out: list[tuple[int, int, str]] = []
        for passage in self.retrievers[stage_id].passages:
            if passage.kind != "knowledge" or not self._allowed(passage, slot):
                continue
            for sentence in T.sentences(passage.text):
                cues = len(_IDENTITY_CUES.findall(sentence))
                if cues and F.mentions_persona(sentence, self.ref) and T.count_tokens(sentence) <= 40:
                    out.append((-cues, len(out), sentence))
        return [s for *_, s in sorted(out)][:6]

    def _own_words(self, stage_id: str, query: str, context: Context, slot: Slot,
                   budget: Q.SentenceBudget | None, exclude: Sequence[str] = ()) -> list[str]:
        """The persona's own sentences that bear on the query (sharing its topic words), most related first."""
        retriever = self.retrievers[stage_id]
        texts = [slot.seed] if slot.seed.kind == "style" and stage_id == slot.stage else []
        texts += [retriever.by_id[i] for i in context.style_ids if i in retriever.by_id and retriever.by_id[i]
                  not in texts]

        def keep(passage: Passage, sentence: str) -> bool:
            return (self._allowed(passage, slot) and T.count_tokens(sentence) <= 60 and sentence not in exclude
                    and F.first_person_markers(sentence, self.lang) and not sentence.rstrip().endswith(("?", "？"))
                    and T.quotes_balanced(sentence))  # not a quotation cut in two by the sentence split

        chosen = self._by_overlap(query, texts, keep)
        return [s for s in chosen if budget is None or budget.allows([s])]

    def _continuation(self, stage_id: str, sentence: str, budget: Q.SentenceBudget | None) -> list[str]:
        """The sentence after `sentence` in its passage, when it goes on in the persona's voice (the reason)."""
        for passage in self.retrievers[stage_id].passages:
            parts = T.sentences(passage.text)
            if sentence in parts:
                i = parts.index(sentence)
                if i + 1 < len(parts) and T.count_tokens(parts[i + 1]) <= 45 and (
                        budget is None or budget.allows([parts[i + 1]])) and passage.id not in self.held_out:
                    return [parts[i + 1]]
        return []

    def _prepare_facts(self, sentences: Sequence[str]) -> None:
        """First-person versions of knowledge sentences: the rules where they are grammatical, else a checked
        model rewrite, else none (the sentence is not used)."""
        todo = sorted({s for s in sentences if s and s not in self.rewrites})
        rescue = []
        for sentence in todo:
            if not F.mentions_persona(sentence, self.ref):
                self.rewrites[sentence] = Fact(sentence, sentence, "verbatim")
                continue
            rule = F.convert_person(sentence, self.ref)
            if not F.mentions_persona(rule, self.ref) and not Q.person_errors(rule, self.lang):
                self.rewrites[sentence] = Fact(sentence, rule, "rule_rewrite")
            else:
                rescue.append(sentence)
        jobs = [Job(f"gr:{stable_id(p, length=16)}", p, self._rewrite_check(s), self._short_params(s))
                for s in rescue
                for p in [self.prompts.fill("grounded.rewrite_fewshot", name=self.project.name, sentence=s)]]
        results = self.runner.run("first-person rewrites (small model)", jobs) if jobs else {}
        for sentence, job in zip(rescue, jobs):
            value = results.get(job.key)
            self.rewrites[sentence] = Fact(sentence, value, "teacher_rewrite") if isinstance(value, str) else None

    def _rewrite_check(self, source: str) -> Callable[[Completion], str]:
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
            if set(T.content_words(source)) - set(T.content_words(text)) - _PRONOUN_WORDS - {
                    w.lower() for a in self.ref.aliases for w in a.split()}:
                raise Reject("fact_dropped")
            if Q.person_errors(text, self.lang):
                raise Reject("ungrammatical")
            return text

        return check

    # -- general data ---------------------------------------------------------------------------------------
    def general(self, items: Sequence[GeneralItem]) -> dict[str, Answer | Failed]:
        """Answer a general request in character when the persona could know it, refuse in character otherwise."""
        out: dict[str, Answer | Failed] = {}
        for item in items:
            answer = self._general_answer(item)
            if isinstance(answer, Answer):
                if not self.budget.allows(T.sentences(answer.response)):
                    answer = Failed("reuse_limit")
                else:
                    self.budget.use(answer.response)
            out[item.id] = answer
        return out

    def _general_answer(self, item: GeneralItem) -> Answer | Failed:
        stage = self.project.stage(item.stage)
        rng = random.Random(stable_id(self.project.seed, item.id))
        year = F.label_year(stage.label)
        names = {"name": self.project.name, "label": T.time_phrase(stage.label, self.lang), "question": item.instruction}
        # The refusal rests on the text itself too: a user's file without known_since still gets refusals.
        later = later_terms(f"{item.instruction} {item.reference}", year, self.lang) if year is not None else []
        knowable = year is None or ((item.known_since is None or item.known_since <= year) and not later)
        if knowable:
            leads = self.budget.fresh(self.prompts.get("grounded.general_lead"))
            lead = fill(rng.choice(leads), **names) if leads else ""
            voiced = _formal(item.reference) if self.lang == "en" else item.reference
            analysis = [self.prompts.fill("grounded.analysis.ask", **names),
                        self.prompts.fill("grounded.analysis.general_ok", **names)]
            response = self.joiner.join(p for p in (lead, voiced) if p)
        else:
            thing = later[0] if later else ""
            analysis = [self.prompts.fill("grounded.analysis.ask", **names),
                        self.prompts.fill("grounded.analysis.after_time", **names, thing=thing) if thing else
                        self.prompts.fill("grounded.analysis.after_time_plain", **names),
                        self.prompts.fill("grounded.analysis.refuse", **names)]
            key = "grounded.refuse_general" if thing else "grounded.refuse_general_plain"
            options = self.budget.fresh(fill(o, **names, thing=thing) for o in self.prompts.get(key))
            if not options:
                return Failed("reuse_limit")
            response = rng.choice(options)
        return Answer(self.joiner.join(analysis), response, "grounded",
                      {"knowable": knowable, "known_since": item.known_since, "later_terms": later})

    # -- helpers --------------------------------------------------------------------------------------------
    def _fill_choice(self, key: str, rng: random.Random, /, **values: Any) -> str:
        """One of the wordings at `key`, filled: a random one of the least used so far, so that six identity
        attacks over six slots are six different questions (and answers), not repeats the dedup then drops."""
        options = self.prompts.get(key)
        if not isinstance(options, list):
            return fill(options, **values).strip()
        fewest = min(self.wording_uses[(key, o)] for o in options)
        choice = rng.choice([o for o in options if self.wording_uses[(key, o)] == fewest])
        self.wording_uses[(key, choice)] += 1
        return fill(choice, **values).strip()

    def _short_params(self, salt: str) -> GenParams:
        seed = int(stable_id(self.project.seed, salt, length=8), 16) % 1_000_000
        return GenParams(temperature=0.7, max_tokens=64, top_p=0.95, stop=("\n",), seed=seed)


_PRONOUN_WORDS = {"she", "her", "hers", "herself", "he", "him", "his", "himself"}
_CONTRACTIONS = {"don't": "do not", "doesn't": "does not", "can't": "cannot", "won't": "will not",
                 "isn't": "is not", "aren't": "are not", "it's": "it is", "you're": "you are", "I'm": "I am",
                 "didn't": "did not", "wasn't": "was not", "there's": "there is", "that's": "that is",
                 "you'll": "you will", "let's": "let us", "I've": "I have", "you've": "you have"}


def _formal(text: str) -> str:
    """Contractions written out, as the persona's period and register would have it."""
    return re.sub(r"\b(" + "|".join(re.escape(k) for k in _CONTRACTIONS) + r")\b",
                  lambda m: _CONTRACTIONS.get(m.group(1), _CONTRACTIONS.get(m.group(1).lower(), m.group(1))), text)


def _join_lead(lead: str, sentence: str, language: str, material: str = "") -> str:
    """A short lead joined to the sentence it introduces ("No, not 1829: in 1833 I met ...")."""
    if not lead:
        return sentence
    if language == "zh":
        return lead + sentence
    if lead.endswith((".", "!", "?")):
        return f"{lead} {sentence}"
    return f"{lead} {F.lower_start(sentence, material)}"


def _closed(lead: str, language: str) -> str:
    """A lead that introduces a sentence, ended as a sentence of its own ("I am Ada, and" -> "I am Ada.")."""
    bare = re.sub(r"(?:[,，]\s*and|[:：,，])\s*$", "", lead.strip())
    return bare if bare.endswith(("。", ".", "!", "?", "！", "？")) else bare + ("。" if language == "zh" else ".")


def _self_contained(sentence: str, passage: Passage) -> bool:
    """False for a sentence that leans on the one before it ("She worked on them ..."), unless it opens its passage."""
    parts = T.sentences(passage.text)
    if parts and parts[0] == sentence:
        return True
    if re.match(r"^(?:It|They|This|These|Those|There|Such|Both|Here|The two|Neither)\b", sentence):
        return False
    return not re.match(r"^\W*\w+(?:\s+[\w'’]+){0,3}\s+(?:them|it|these|those|this)\b", sentence)


def _fresh(facts: list[Fact], budget: Q.SentenceBudget | None) -> list[Fact]:
    return [f for f in facts if budget is None or budget.allows(T.sentences(f.first))]


def _without_self_naming(text: str, ref: F.PersonaRef) -> str:
    """Text without the persona naming themselves ("I am Ada Lovelace"), which is first person, not third."""
    names = "|".join(re.escape(a) for a in ref.aliases)
    return re.sub(rf"(?:\bI am|我是)\s*(?:{names})", "", text) if names else text


def _without_quotes(text: str) -> str:
    """Text outside quotation marks (a persona may quote someone who names them)."""
    return re.sub(r"“[^”]*”|\"[^\"]*\"", "", text)


def _in(needle: str, haystack: str) -> bool:
    return needle.lower() in haystack.lower()


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
