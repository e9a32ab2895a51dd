"""Offline (grounded) data a careful annotator would keep, on all three example personas.

The checks here are the acceptance of the data-construction issue: no held-out leak, no sentence reused across
many responses, no first-person conversion error in any response, opinion statements about views the persona
really holds, and Chinese false premises that are really false. Each also has a unit test of the check itself on
the bad outputs the old templates produced, so a check that stops working fails here too.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from conftest import EXAMPLES
from persllm import template
from persllm import text as T
from persllm.backends.fake import FakeBackend
from persllm.config import load_project
from persllm.construct import ConstructResult, construct
from persllm.construct import facts as F
from persllm.construct import quality as Q
from persllm.construct.views import find_views
from persllm.ingest import ingest
from persllm.types import Passage

EXAMPLE_NAMES = ("ada-lovelace", "marie-curie", "lu-xun")


@cache
def built(example: str, preset: str | None = "demo") -> tuple[ConstructResult, tuple[Passage, ...], str]:
    """Construct the example offline; the fake teacher's outputs all fail validation, so rules do everything."""
    project = load_project(EXAMPLES / example, preset=preset)
    passages, _ = ingest(project)
    return construct(project, passages, FakeBackend(["not usable"])), tuple(passages), project.language


@pytest.mark.parametrize("preset", ["demo", None])
@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_examples_build_clean_data(example: str, preset: str | None) -> None:
    result, passages, lang = built(example, preset)
    samples, audit = result.samples, result.stats["audit"]
    stages = {s.stage for s in samples}
    assert {(st, k) for st in stages for k in ("ordinary", "opinion", "induced")} <= {(s.stage, s.kind)
                                                                                        for s in samples}
    # held-out seeds (knowledge and style) never reach a training sample
    held = {s.seed_id for s in samples if s.split == "test"}
    assert held and audit["held_out_leaks"] == 0
    assert not Q.held_out_leaks(samples, passages, held)
    # no sentence shared by a response with three or more others; no conversion error anywhere
    assert audit["shared_sentence_share"] < 0.05
    assert Q.shared_sentence_share([s.response for s in samples]) < 0.05
    for sample in samples:
        assert not Q.person_errors(sample.response, lang), sample.response
        assert not Q.person_errors(sample.question, lang), sample.question
    assert audit["rewrite_grammar_errors"] == 0
    assert audit["low_relevance_share"] < 0.05
    assert sum(result.stats["dropped"].values()) > 0  # slots that could not be built honestly are counted


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_opinion_statements_are_about_the_personas_own_views(example: str) -> None:
    result, passages, lang = built(example)
    project = load_project(EXAMPLES / example)
    ref = F.persona_ref(project.name, lang, [p.text for p in passages if p.kind == "knowledge"], project.aliases)
    views = {v.sentence: v for v in find_views(passages, ref)}
    by_id = {p.id: p for p in passages}
    opinions = [s for s in result.samples if s.kind == "opinion"]
    assert opinions
    for sample in opinions:
        view = views[sample.meta["view"]]  # the view is one the material states
        assert by_id[sample.meta["view_id"]].stage == sample.stage
        # the statement is about the view's own topic: it takes up most of the view's topic words
        topic = Q.topic_terms(view.proposition or view.sentence, lang)
        assert len(topic & Q.topic_terms(sample.question, lang)) / len(topic) >= 0.6, sample.question
        # the persona voices the view in their own words, and the stance follows the user's relation to it
        assert view.sentence in sample.response or T.normalize(view.sentence)[2:] in sample.response
        assert sample.meta["stance"] == sample.meta["relation"] in ("agree", "differ", "conflict")


def test_chinese_false_premises_are_false() -> None:
    result, _, _ = built("lu-xun", None)
    wrong = [s for s in result.samples if s.meta.get("premise") == "wrong_fact"]
    assert wrong
    for sample in wrong:
        truth, false = sample.meta["true_sentence"], sample.meta["false_value"]
        assert false not in truth and false in sample.question and sample.meta["truth"] in truth
        assert sample.meta["truth"] in sample.response and false in sample.analysis


def test_chinese_bare_year_stages_read_as_years() -> None:
    # 鲁迅's stages are labelled "1922" and "1934": inside a sentence they must read "1922年", never "在1922我".
    result, _, _ = built("lu-xun", None)
    texts = [t for s in result.samples for t in (s.question, s.analysis, s.response)]
    said = [t for t in texts if re.search(r"19(?:22|34)(?!年)(?=[\u4e00-\u9fff，。：；？])", t)]
    assert not said, said[:3]
    assert any("1934年" in t for t in texts)
    prompt = template.system_prompt(template.context_for(load_project(EXAMPLES / "lu-xun"), "early"))
    assert "现在是1922年。" in prompt
    assert T.time_phrase("1922", "zh") == "1922年" and T.time_phrase("1920年代", "zh") == "1920年代"
    assert T.time_phrase("1835", "en") == "1835"


def test_chinese_replacement_works_between_cjk_characters() -> None:
    ref = F.persona_ref("鲁迅", "zh", ["他生于绍兴。"])
    sentence = "1918年5月，他在《新青年》上发表了《狂人日记》。"
    premise = F.perturb(sentence, ref, ["故乡"], random.Random(0))
    assert premise is not None and premise.false_value not in sentence and premise.false_value in premise.false_sentence
    titled = F.perturb("他在《新青年》上发表了《狂人日记》。", ref, ["故乡"], random.Random(0))
    assert titled is not None and "故乡" in titled.false_sentence and titled.truth in ("新青年", "狂人日记")


def test_never_lived_events_survive_a_shared_character() -> None:
    result, _, _ = built("lu-xun", None)
    events = [s for s in result.samples if s.meta.get("premise") == "never_lived"]
    assert events  # 瑞典 shares characters with the material (典, 女) but is not in it


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_events_long_before_the_persona_are_denied_as_witnessed(example: str) -> None:
    from persllm.data import anachronisms
    result, _, lang = built(example, None)
    project = load_project(EXAMPLES / example)
    first = F.label_year(project.stages[0].label)
    events = [s for s in result.samples if s.meta.get("premise") == "before_time"]
    assert events
    evaluated = {a.get(lang, a["en"]) for a in anachronisms()}
    for sample in events:
        assert first is not None and sample.meta["year"] <= first - F.LONG_BEFORE_YEARS
        assert sample.meta["thing"] in sample.question and sample.meta["thing"] not in evaluated  # no eval item
        assert str(sample.meta["year"]) in sample.response and str(sample.meta["year"]) in sample.analysis
    negatives = [n for n in result.negatives if n.type == "induced" and n.sample_id in {s.id for s in events}]
    assert negatives and all(n.response not in {s.response for s in events} for n in negatives)


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_identity_attacks_rotate_through_their_wordings(example: str) -> None:
    from collections import Counter

    from persllm.construct.plan import make_plan
    result, passages, _ = built(example)
    project = load_project(EXAMPLES / example, preset="demo")
    slots = Counter(s.stage for s in make_plan(project, list(passages)) if s.variant == "identity")
    samples = [s for s in result.samples if s.meta.get("premise") == "identity"]
    for stage, n in slots.items():
        questions = [s.question for s in samples if s.stage == stage]
        assert len(questions) == len(set(questions)) and len(questions) >= n - 2, (stage, n, questions)


def test_identity_answers_without_a_fact_end_as_sentences() -> None:
    for example in EXAMPLE_NAMES:
        result, _, _ = built(example, None)
        for sample in result.samples:
            if sample.meta.get("premise") == "identity":
                assert not sample.response.rstrip().endswith((":", "：", ",", "，", " and")), sample.response


@pytest.mark.parametrize("bad", [
    "In January 1816 Lady Byron left the family home with the baby me.",
    "On 14 August 1843 me wrote Babbage a long letter.",
    "In 1838 William King was created Earl of me, and I became the me.",
    "He gave the book to I.",
    "I were married in 1835.",
    "In 1910 I and the chemist André Debierne isolated radium.",
    "In 1903 the Academy divided the prize between Henri Becquerel and Pierre and I, for their work.",
    "Pierre Curie and I announced a new element, which they named polonium.",
    "I wrote the notes myself and she signed them herself.",
])
def test_person_errors_catch_old_conversion_failures(bad: str) -> None:
    assert Q.person_errors(bad, "en")


@pytest.mark.parametrize("good", [
    "I married William King in July 1835, and in 1838 I became the Countess of Lovelace.",
    "Lady Byron and I visited Babbage's house in Dorset Street.",
    "Mr Babbage has the most inventive mind I know.",
    "It makes me think, and that is more than most gentlemen do for me.",
    "Let me tell you what I saw.",
])
def test_person_errors_pass_grammatical_first_person(good: str) -> None:
    assert not Q.person_errors(good, "en")


def test_the_personas_given_name_ends_a_named_thing() -> None:
    curie = F.persona_ref("Marie Curie", "en", ["She worked."], ["Maria", "Maria Skłodowska"])
    assert "Szczuki" in F.entities("At Szczuki Maria fell in love with the eldest son.", curie)
    assert "Pierre Curie" in F.entities("She married Pierre Curie in July 1895.", curie)  # a surname is shared
    ada = F.persona_ref("Ada Lovelace", "en", ["She wrote."], ["Ada Byron"])
    assert F.entities("In Note G Ada also warned against exaggerated ideas.", ada) == ["Note G"]


@pytest.mark.parametrize("example", ["ada-lovelace", "marie-curie"])
def test_ordinary_questions_ask_of_people_as_people(example: str) -> None:
    result, _, _ = built(example)
    asked = [s.question for s in result.samples if s.kind == "ordinary"]
    assert asked
    for question in asked:  # "What was Babbage about?", "What do you think of Frenchman?" were both made once
        assert not re.search(r"What was (?:Babbage|Pierre|Prime Minister .*|Mr \w+|Lady \w+) about", question)
        assert not re.search(r"\b(?:Frenchman|Among|Maria|Ada)\b", question), question


def test_rule_rewrite_keeps_subjects_and_titles() -> None:
    ref = F.persona_ref("Ada Lovelace", "en", ["She wrote."], ["Countess of Lovelace", "Ada Byron"])
    assert F.convert_person("On 14 August 1843 Ada wrote to Babbage.", ref) == "On 14 August 1843 I wrote to Babbage."
    converted = F.convert_person("In 1838 William King was created Earl of Lovelace, and Ada became the Countess of "
                                 "Lovelace.", ref)
    assert converted == "In 1838 William King was created Earl of Lovelace, and I became the Countess of Lovelace."


def test_relevance_and_reuse_checks() -> None:
    assert Q.relevance("Tell me about Lady Byron.", "Lady Byron taught me mathematics.", "en") == 1.0
    assert Q.relevance("Tell me about Lady Byron.", "I have begun my wings in earnest.", "en") == 0.0
    budget = Q.SentenceBudget(limit=2)
    budget.use("I like engines. They hum.")
    budget.use("I like engines.")
    assert not budget.allows(["I like engines!"]) and budget.allows(["They hum."])
    shared = ["Yes, I agree.", "Yes, I agree.", "Yes, I agree.", "Yes, I agree.", "Something else."]
    assert Q.shared_sentence_share(shared) == 0.8


def test_general_refusal_does_not_need_known_since(tmp_path: Path) -> None:
    root = tmp_path / "ada"
    shutil.copytree(EXAMPLES / "ada-lovelace", root, ignore=shutil.ignore_patterns("out"))
    lines = [{"messages": [{"role": "user", "content": "How do I protect my computer from a virus?"},
                           {"role": "assistant", "content": "Install updates and use antivirus software."}]},
             {"messages": [{"role": "user", "content": "How should I store apples through the winter?"},
                           {"role": "assistant", "content": "Keep them cool, dark and apart from each other."}]}]
    (root / "general.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    project = load_project(root, preset="demo", overrides=["construct.general_data=general.jsonl",
                                                           "construct.general_per_stage=2"])
    passages, _ = ingest(project)
    general = [s for s in construct(project, passages, FakeBackend(["x"])).samples if s.kind == "general"]
    refused = [s for s in general if "computer" in s.question]
    kept = [s for s in general if "apples" in s.question]
    assert refused and all(not s.meta["knowable"] and "Computer?" in s.response for s in refused)
    assert kept and all(s.meta["knowable"] and "cool, dark" in s.response for s in kept)


def test_chinese_example_runs_end_to_end(tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "lu-xun"
    shutil.copytree(EXAMPLES / "lu-xun", root, ignore=shutil.ignore_patterns("out"))
    sets = ["teacher=fake", "construct.mode=grounded", f"base_model=hf:{tiny_model}", "sft.batch_size=2",
            "sft.max_steps=2", "dpo.batch_size=2", "dpo.max_steps=2", "eval.max_new_tokens=6", "eval.max_probes=6",
            "sft.max_length=2048", "dpo.max_length=2048",  # the tiny test tokenizer spells Chinese byte by byte
            "eval.judge_items=1", "eval.judge_repeats=1", "eval.judge_retries=0", "eval.ipip_interview_items=0"]
    result = subprocess.run([sys.executable, "-m", "persllm", "run", str(root), "--preset", "demo",
                             *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    out = root / "out"
    samples = [json.loads(line) for line in (out / "construct" / "samples.jsonl").read_text().splitlines()]
    assert {s["stage"] for s in samples} == {"early", "late"}
    stats = json.loads((out / "construct" / "stats.json").read_text())
    assert stats["audit"]["held_out_leaks"] == 0 and stats["audit"]["rewrite_grammar_errors"] == 0
    assert any("我" in s["response"] for s in samples if s["kind"] == "opinion")
    assert (out / "dpo" / "adapter" / "adapter_config.json").is_file() and (out / "eval" / "report.json").is_file()


def _proposing_teacher(request: object) -> str:
    """A small model's typical proposals: a loose question about one word of the passage, or a vague one."""
    text = str(request)
    if "Question:" not in text:
        return "not usable"  # first-person rewrites: all rejected, the rules do them
    passage = text.rsplit("Passage:", 1)[-1].split("\n")[0]
    word = max(T.content_words(passage), key=len)
    return f"Why did you choose to become a {word}?" if len(word) % 2 else f"How did {word} feel when you saw it?"


def test_model_questions_get_answers_that_take_them_up() -> None:
    project = load_project(EXAMPLES / "ada-lovelace", preset="demo")
    passages, _ = ingest(project)
    result = construct(project, passages, FakeBackend(_proposing_teacher))
    assert result.stats["rejected"].get("vague", 0) > 0  # "... when you saw it?": saw what?
    assert result.stats["rejected"].get("unanswerable", 0) > 0  # no seed sentence takes the question up
    for sample in result.samples:
        if sample.meta["origin"].get("question") == "teacher":
            for sentence in T.sentences(sample.response):
                assert Q.relevance(sample.question, sentence, "en", project.aliases) >= 0.5, (sample.question,
                                                                                                sentence)
