"""The full PersLLM construction with a capable teacher: it writes the questions, the analyses and the answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from persllm.backends.base import Completion, GenParams
from persllm.backends.cache import request_key
from persllm.config import Project, StageConfig
from persllm.construct.jobs import Failed, Job, Runner
from persllm.construct.plan import Slot
from persllm.construct.records import Answer, Draft, GeneralItem, Question
from persllm.construct.retrieval import Context
from persllm.construct.validate import Voice, parse_answer, parse_question, parse_response
from persllm.prompts import Prompts
from persllm.text import time_phrase
from persllm.types import CONSTRUCTED_NEGATIVES, Message

Parser = Callable[[Completion], Any]
NegativeRequest = Callable[["FullMethod", Draft, dict[str, tuple[str, Context]]], list[Message] | None]


class FullMethod:
    """Question generation, chain-of-thought golden answers and DPO negatives, all written by the teacher."""

    name = "full"

    def __init__(self, project: Project, prompts: Prompts, runner: Runner) -> None:
        self.project = project
        self.prompts = prompts
        self.runner = runner
        cfg = project.construct
        self.params = GenParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=project.seed)
        self.voice = Voice(project.name, project.language, tuple(project.aliases))

    # -- questions ------------------------------------------------------------------------------------------
    def questions(self, slots: Sequence[Slot]) -> dict[str, Question | Failed]:
        """One teacher-written question per slot."""
        jobs, by_key = [], {}
        for slot in slots:
            request = self._question_request(slot)
            key = _key("question", slot.id, request)
            by_key[key] = slot.id
            jobs.append(Job(key, request, self.question_parser(slot.kind), self.params))
        results = self.runner.run("questions", jobs)
        return {by_key[k]: v for k, v in results.items()}

    def _question_request(self, slot: Slot) -> list[Message]:
        stage = self.project.stage(slot.stage)
        names = self._names(stage)
        extra: dict[str, str] = {}
        if slot.kind == "opinion":
            extra["stance"] = self.prompts.fill(f"question.stances.{slot.variant}", **names)
        elif slot.kind == "induced":
            extra["subtype"] = self.prompts.fill(f"question.subtypes.{slot.variant}", **names)
        system = self.prompts.fill(f"question.{slot.kind}", **names, **extra)
        material = self.prompts.fill(f"question.material.{slot.seed.kind}", **names)
        user = self.prompts.fill("question.user", **names, material=material, seed=slot.seed.text)
        return [Message("system", system), Message("user", user)]

    # -- golden answers -------------------------------------------------------------------------------------
    def answers(self, drafts: Sequence[Draft]) -> dict[str, Answer | Failed]:
        """Chain-of-thought golden answer for each draft, from that stage's retrieved material only."""
        jobs, by_key = [], {}
        for draft in drafts:
            induced = draft.slot.kind == "induced"
            request = self.answer_request(draft.slot.stage, draft.question.text, draft.context, induced=induced)
            key = _key("answer", draft.slot.id, request)
            by_key[key] = draft.slot.id
            jobs.append(Job(key, request, self.answer_parser(induced), self.params))
        results = self.runner.run("answers", jobs)
        return {by_key[k]: v for k, v in results.items()}

    def answer_request(self, stage_id: str, question: str, context: Context, induced: bool) -> list[Message]:
        """The method's annotation prompt: time, persona, knowledge block, style block, CoT rules, examples."""
        names = self._names(self.project.stage(stage_id))
        warning = self.prompts.fill("answer.warning", **names) if induced else ""
        system = self.prompts.fill("answer.system", **names, knowledge=context.knowledge or "-",
                                   style=context.style or "-", warning=warning,
                                   examples=self.prompts.get("answer.examples"))
        return [Message("system", system), Message("user", self.prompts.fill("answer.user", question=question))]

    # -- DPO negatives --------------------------------------------------------------------------------------
    def negatives(self, drafts: Sequence[Draft], other: dict[str, tuple[str, Context]],
                  types: Sequence[str]) -> dict[tuple[str, str], Answer | Failed]:
        """Rejected-answer material: other stage, generic assistant, and premise-accepting answers."""
        jobs: list[Job] = []
        by_key: dict[str, tuple[str, str]] = {}
        for draft in drafts:
            sid, induced = draft.slot.id, draft.slot.kind == "induced"
            for neg_type in (t for t in CONSTRUCTED_NEGATIVES if t in types):
                request = self.NEGATIVE_REQUESTS[neg_type](self, draft, other)
                if request is None:
                    continue
                key = _key(f"negative-{neg_type}", sid, request)
                by_key[key] = (sid, neg_type)
                jobs.append(Job(key, request, self.negative_parser(neg_type, induced), self.params))
        results = self.runner.run("negatives", jobs)
        return {by_key[k]: v for k, v in results.items()}

    def _other_stage_request(self, draft: Draft, other: dict[str, tuple[str, Context]]) -> list[Message] | None:
        if draft.slot.id not in other:
            return None
        stage_id, context = other[draft.slot.id]
        return self.answer_request(stage_id, draft.question.text, context, draft.slot.kind == "induced")

    def _non_personified_request(self, draft: Draft, other: dict[str, tuple[str, Context]]) -> list[Message]:
        return [Message("system", self.prompts.get("negative.non_personified")), Message("user", draft.question.text)]

    def _induced_request(self, draft: Draft, other: dict[str, tuple[str, Context]]) -> list[Message] | None:
        if draft.slot.kind != "induced":
            return None
        names = self._names(self.project.stage(draft.slot.stage))
        return [Message("system", self.prompts.fill("negative.accept_premise", **names)),
                Message("user", draft.question.text)]

    NEGATIVE_REQUESTS: ClassVar[dict[str, NegativeRequest]] = {
        "other_stage": _other_stage_request, "non_personified": _non_personified_request,
        "induced": _induced_request}
    """The teacher request of each constructed negative type (None where a draft cannot have one)."""

    # -- stylised general data ------------------------------------------------------------------------------
    def general(self, items: Sequence[GeneralItem]) -> dict[str, Answer | Failed]:
        """General instructions re-answered in the persona's voice (or refused in character)."""
        jobs, by_key = [], {}
        for item in items:
            names = self._names(self.project.stage(item.stage))
            system = self.prompts.fill("general.system", **names, style=item.style or "-",
                                       reference=item.reference, known_since=item.known_since_text)
            request = [Message("system", system), Message("user", item.instruction)]
            key = _key("general", item.id, request)
            by_key[key] = item.id
            jobs.append(Job(key, request, self.general_parser(), self.params))
        results = self.runner.run("general", jobs)
        return {by_key[k]: v for k, v in results.items()}

    # -- parsers: what each teacher output must pass (tests/test_transcripts.py runs them on real transcripts) -----
    def question_parser(self, kind: str) -> Parser:
        """One question (or opinion statement) of `kind`, asked of the persona in the project's language."""
        def parse(completion: Completion) -> Question:
            return Question(parse_question(completion, kind, self.voice), origin="teacher")

        return parse

    def answer_parser(self, induced: bool) -> Parser:
        """A CoT golden answer in the persona's voice; for an induced question it must correct the premise."""
        def parse(completion: Completion) -> Answer:
            analysis, response = parse_answer(completion, self.voice, induced=induced)
            return Answer(analysis, response, origin="teacher")

        return parse

    def general_parser(self) -> Parser:
        """A general instruction answered (or declined) in character: the answer checks without a premise check."""
        return self.answer_parser(induced=False)

    def negative_parser(self, neg_type: str, induced: bool) -> Parser:
        """Rejected-answer material: other_stage is a full answer, the others a plain reply."""
        if neg_type == "other_stage":
            return self.answer_parser(induced)
        personified = neg_type != "non_personified"  # the generic assistant may say it is an AI: that is the point

        def parse(completion: Completion) -> Answer:
            return Answer("", parse_response(completion, self.voice, personified), origin="teacher")

        return parse

    def _names(self, stage: StageConfig) -> dict[str, str]:
        return {"name": self.project.name, "label": time_phrase(stage.label, self.project.language)}


def _key(phase: str, item: str, request: Sequence[Message]) -> str:
    return f"{phase}:{item}:{request_key('', request, GenParams())[:12]}"
