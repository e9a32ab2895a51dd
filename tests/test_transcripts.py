"""The full method against realistic teacher output: what capable chat models return, kept clean or rejected by reason.

tests/transcripts/teacher_outputs.jsonl holds raw teacher texts in the habits of GPT-4o, Claude, Qwen2.5 and Llama 3.1
(markdown tags, JSON in fences, preambles, notes, refusals, third-person replies, premise-accepting answers), each with
the result the construct stage must reach. Every check goes through the parsers FullMethod builds for its jobs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from persllm.backends.base import Completion
from persllm.backends.fake import FakeBackend
from persllm.config import Project, StageConfig
from persllm.construct import validate
from persllm.construct.full import FullMethod
from persllm.construct.jobs import Failed, Runner
from persllm.construct.plan import Slot
from persllm.construct.records import Answer, Draft, GeneralItem, Question
from persllm.construct.retrieval import Context
from persllm.construct.validate import Reject
from persllm.prompts import load_prompts
from persllm.types import Passage

CORPUS = Path(__file__).parent / "transcripts"
RECORDS: list[dict[str, Any]] = [json.loads(line) for line in
                                 (CORPUS / "teacher_outputs.jsonl").read_text(encoding="utf-8").splitlines() if line]
BY_ID = {r["id"]: r for r in RECORDS}
PERSONAS: dict[str, dict[str, Any]] = json.loads((CORPUS / "personas.json").read_text(encoding="utf-8"))
VARIANT = {"ordinary": "", "opinion": "agree", "induced": "wrong_fact"}

# The deviations the issue lists, by the `covers` tag of their records; each must be in the corpus.
REQUIRED = {"bold_tags", "markdown_headings", "label_style", "json_fence", "json_fence_preamble", "preamble",
            "preamble_quotes", "trailing_note", "two_questions", "numbered_list", "third_person", "as_an_ai",
            "refusal", "accepts_premise", "truncated", "fullwidth_tags", "empty_response", "repeated_tags"}


def _project(persona: str) -> Project:
    info = PERSONAS[persona]
    return Project(name=persona, language=info["language"], aliases=list(info["aliases"]),
                   stages=[StageConfig(id="s", label=info["label"], knowledge="k.txt", style="s.txt")])


def _method(persona: str, teacher: FakeBackend | None = None) -> FullMethod:
    project = _project(persona)
    return FullMethod(project, load_prompts(project.language), Runner(teacher or FakeBackend(), attempts=1))


def _parser(method: FullMethod, record: dict[str, Any]) -> Callable[[Completion], Any]:
    """The parser FullMethod gives the job that produced this record."""
    phase, induced = record["phase"], record.get("kind") == "induced"
    if phase == "question":
        return method.question_parser(record["kind"])
    if phase == "answer":
        return method.answer_parser(induced)
    if phase == "negative":
        return method.negative_parser(record["negative"], induced)
    return method.general_parser()


def _completion(record: dict[str, Any]) -> Completion:
    return Completion(record["text"], finish_reason=record["finish_reason"])


def _outcome(record: dict[str, Any]) -> dict[str, Any]:
    """What the construct stage makes of the record, in the corpus's `expect` form."""
    try:
        value = _parser(_method(record["persona"]), record)(_completion(record))
    except Reject as rej:
        return {"keep": False, "reason": rej.reason}
    return _kept(value)


def _kept(value: Question | Answer) -> dict[str, Any]:
    if isinstance(value, Question):
        return {"keep": True, "question": value.text}
    return {"keep": True, "analysis": value.analysis, "response": value.response}


@pytest.mark.parametrize("record", RECORDS, ids=[r["id"] for r in RECORDS])
def test_transcript_is_kept_clean_or_rejected_by_reason(record: dict[str, Any]) -> None:
    assert _outcome(record) == record["expect"]


def test_corpus_covers_the_deviations_in_both_languages() -> None:
    assert len(RECORDS) >= 40
    assert {r["phase"] for r in RECORDS} == {"question", "answer", "negative", "general"}
    for language in ("en", "zh"):
        mine = [r for r in RECORDS if r["language"] == language]
        assert {r["phase"] for r in mine} == {"question", "answer", "negative", "general"}, language
        assert any(r["expect"]["keep"] for r in mine) and any(not r["expect"]["keep"] for r in mine)
    assert REQUIRED <= {r["covers"] for r in RECORDS}
    for record in RECORDS:
        assert record["persona"] in PERSONAS and record["language"] == PERSONAS[record["persona"]]["language"]
        assert record["finish_reason"] in ("stop", "length")
        assert record["phase"] == "general" or record["kind"] in ("ordinary", "opinion", "induced")
        if record["expect"]["keep"]:  # a kept text is clean: no markup, tags or notes left
            for part in record["expect"].values():
                if isinstance(part, str):
                    assert not re.search(r"\*\*|^#|\[(?:Analysis|Response)\]|【|Note:|```", part), record["id"]


# Each handling of a deviation, switched off, must change the outcome of the records that need it.
_NEVER = re.compile(r"(?!x)x")
_ALWAYS = re.compile(r"")
HANDLINGS: list[tuple[str, str, Any, list[str]]] = [
    ("think blocks", "_THINK", _NEVER, ["q-en-curie-think", "a-en-think-block"]),
    ("bold [tags]", "_BRACKET_TAG", _NEVER, ["a-en-bold-tags", "a-en-curie-bold-colon", "zh-fullwidth-tags"]),
    ("markdown headings", "_HEADING_TAG", _NEVER, ["a-en-md-headings", "g-en-headings-chatter"]),
    ("bold labels", "_BOLD_TAG", _NEVER, ["a-en-label-style", "zh-bold-labels"]),
    ("plain labels", "_PLAIN_TAG", _NEVER, ["a-en-curie-plain-labels"]),
    ("JSON in fences", "_FENCED", _NEVER, ["a-en-json-fence", "a-en-json-preamble", "zh-json-keys"]),
    ("question preambles", "_PREAMBLE", _NEVER,
     ["q-en-preamble-quotes", "q-zh-preamble-quotes", "n-zh-neutral-preamble"]),
    ("label-only lines", "_LABEL_LINE", _NEVER, ["q-en-heading-bold-quoted"]),
    ("trailing notes", "_NOTE", _NEVER, ["a-en-trailing-note", "a-en-trailing-chatter", "zh-trailing-note",
                                         "q-en-induced-note-label"]),
    ("parenthesised notes", "_PAREN_LINE", _NEVER, ["q-en-induced-paren"]),
    ("stage directions", "_STAGE_DIRECTION", _NEVER, ["a-en-stage-direction"]),
    ("hand-off after the tag", "_HANDOFF", {"en": "(?!x)x", "zh": "(?!x)x"}, ["a-en-handoff-after-tag"]),
    ("markdown emphasis", "_unmark", lambda text: text, ["a-en-emphasis", "q-en-bold-label"]),
    ("wrapping quotes", "_unquote", lambda text: text.strip(), ["q-en-preamble-quotes", "a-en-preamble"]),
    ("two questions in one", "_COMPOUND", _NEVER, ["q-en-compound", "q-zh-compound"]),
    ("imperative requests", "_IMPERATIVE", _NEVER, ["q-en-curie-imperative", "q-zh-imperative"]),
    ("refusals", "_REFUSAL", _NEVER, ["a-en-sorry-in-response", "n-en-accept-refusal", "n-zh-refusal"]),
    ("refusal openings", "_REFUSAL_START", _NEVER, ["q-en-induced-refusal"]),
    ("AI talk in replies", "_BREAKS_CHARACTER", _NEVER, ["a-en-as-ai-whole", "a-en-as-ai-in-response",
                                                         "zh-as-ai-whole", "g-en-as-ai", "g-zh-as-ai"]),
    ("the teacher speaking as an AI", "_SPEAKS_AS_AI", _NEVER, ["a-en-as-ai-in-analysis", "q-en-induced-as-ai"]),
    ("third-person replies", "_third_person", lambda response, voice: False,
     ["a-en-third-person-name", "a-en-third-person-pronoun", "a-en-curie-third-person", "zh-third-person-pronoun",
      "zh-third-person-name", "n-en-accept-third-person"]),
    ("narrated replies", "_THIRD_VERBS", {"en": "(?!x)x", "zh": "(?!x)x"}, ["a-en-narrated", "zh-narrated"]),
    ("third-person questions", "_names_persona", lambda text, voice: False,
     ["q-en-third-person", "q-zh-third-person"]),
    ("analysis accepting the premise", "_NAMES_ERROR", _ALWAYS,
     ["a-en-accepts-premise-holds", "a-en-accepts-premise-silent", "zh-accepts-premise"]),
    ("explicit acceptance", "_ACCEPTS", _NEVER, ["a-en-accepts-premise-holds", "zh-accepts-premise"]),
    ("reply going along with the premise", "_CORRECTS", _ALWAYS,
     ["a-en-response-goes-along", "zh-response-goes-along"]),
    ("wrong language", "_check_language", lambda text, language: None, ["q-zh-english", "zh-english-answer"]),
]


@pytest.mark.parametrize(("attr", "off", "ids"), [h[1:] for h in HANDLINGS], ids=[h[0] for h in HANDLINGS])
def test_each_handling_is_what_catches_its_records(monkeypatch: pytest.MonkeyPatch, attr: str, off: Any,
                                                   ids: list[str]) -> None:
    for rid in ids:
        assert _outcome(BY_ID[rid]) == BY_ID[rid]["expect"], rid
    monkeypatch.setattr(validate, attr, off)
    for rid in ids:
        assert _outcome(BY_ID[rid]) != BY_ID[rid]["expect"], f"{rid} still passes with {attr} switched off"


def test_premise_check_applies_to_induced_items_only() -> None:
    record = BY_ID["a-en-accepts-premise-holds"]
    method = _method(record["persona"])
    with pytest.raises(Reject, match="accepts_premise"):
        method.answer_parser(induced=True)(_completion(record))
    assert method.answer_parser(induced=False)(_completion(record)).response  # an ordinary question may be true
    assert method.general_parser()(_completion(record)).response


def test_only_the_generic_assistant_negative_may_talk_like_an_ai() -> None:
    record = BY_ID["n-en-neutral-as-ai"]
    method = _method(record["persona"])
    assert method.negative_parser("non_personified", induced=False)(_completion(record)).response
    with pytest.raises(Reject, match="breaks_character"):
        method.negative_parser("induced", induced=True)(_completion(record))
    tagged = Completion(f"[Analysis] The user asks.\n[Response] {record['text']}")
    with pytest.raises(Reject, match="breaks_character"):
        method.negative_parser("other_stage", induced=False)(tagged)


# -- the whole method through Runner ------------------------------------------------------------------------------
def _reply(request: Any) -> Completion:
    """The corpus text whose id the request carries (in the seed, question or instruction)."""
    rid = re.search(r"<<([\w-]+)>>", request[-1].content).group(1)
    return _completion(BY_ID[rid])


def _slot(record: dict[str, Any]) -> Slot:
    kind = record.get("kind") or "ordinary"
    seed = Passage(id=f"p-{record['id']}", persona="p", stage="s", kind="knowledge",
                   text=f"Material <<{record['id']}>>.", source="k.txt", line=1)
    return Slot(record["id"], "s", seed, kind, VARIANT[kind], "train")


def _draft(record: dict[str, Any]) -> Draft:
    return Draft(_slot(record), Question(f"Question <<{record['id']}>>?", "teacher"), Context("k", "s", (), ()))


def _run_phases(method: FullMethod, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every record through the FullMethod phase that produces it; results by record id."""
    of = {phase: [r for r in records if r["phase"] == phase] for phase in ("question", "answer", "negative", "general")}
    results: dict[str, Any] = dict(method.questions([_slot(r) for r in of["question"]]))
    results.update(method.answers([_draft(r) for r in of["answer"]]))
    for neg_type in ("non_personified", "induced"):
        chosen = [r for r in of["negative"] if r["negative"] == neg_type]
        negatives = method.negatives([_draft(r) for r in chosen], {}, [neg_type])
        results.update({sid: value for (sid, _), value in negatives.items()})
    items = [GeneralItem(r["id"], "s", f"Instruction <<{r['id']}>>", "-", None, "", ()) for r in of["general"]]
    results.update(method.general(items))
    return results


@pytest.mark.parametrize("persona", sorted(PERSONAS))
def test_full_method_through_runner_counts_rejections_by_reason(persona: str) -> None:
    records = [r for r in RECORDS if r["persona"] == persona]
    teacher = FakeBackend(_reply)
    method = _method(persona, teacher)
    results = _run_phases(method, records)
    assert len(teacher.calls) == len(records)  # one request per record: each was asked exactly once
    expected = Counter(r["expect"]["reason"] for r in records if not r["expect"]["keep"])
    assert method.runner.rejected == expected
    phase_name = {"question": "questions", "answer": "answers", "negative": "negatives", "general": "general"}
    assert method.runner.accepted == Counter(phase_name[r["phase"]] for r in records if r["expect"]["keep"])
    for record in records:
        value = results[record["id"]]
        if record["expect"]["keep"]:
            assert _kept(value) == record["expect"], record["id"]
        else:
            assert value == Failed(record["expect"]["reason"]), record["id"]
