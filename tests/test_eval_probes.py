"""Probe files: validation with file:line errors, phrase-rule semantics, default probes and per-kind scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persllm.errors import DataError
from persllm.eval.criteria.anti_induction import anti_induction
from persllm.eval.criteria.probes import probe_scores
from persllm.eval.generate import Answer
from persllm.eval.probes import contains, load_probes, probe_to_json, score_probe
from persllm.types import Probe

STAGES = ["early", "late"]


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good(**fields: object) -> str:
    record = {"id": "p1", "kind": "knowledge", "stage": "early", "question": "Where were you born?",
              "expect_any": ["Graz"]} | fields
    return json.dumps(record)


def test_valid_file_loads_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, [good(), "", good(id="p2", stage=None, reference="In Graz.", reject_any=["Vienna"])])
    probes = load_probes(path, STAGES)
    assert [p.id for p in probes] == ["p1", "p2"]
    assert probes[1].stage == "late"  # no stage: the latest stage
    assert probes[1].meta["reference"] == "In Graz."
    assert probe_to_json(probes[1])["reference"] == "In Graz."


def test_every_problem_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, [
        good(),
        "{not json",
        good(id="p1"),
        good(id="p3", stage="middle"),
        good(id="p4", expect_anyy=["x"]),
        good(id="p5", expect_any="Graz"),
        json.dumps({"id": "p6", "kind": "knowledge", "question": "Q?"}),
        good(id="", question=""),
    ])
    with pytest.raises(DataError) as info:
        load_probes(path, STAGES)
    message = str(info.value)
    assert f"{path}:2: not valid JSON" in message
    assert f"{path}:3: id 'p1' is already used on line 1" in message
    assert f"{path}:4: stage 'middle' is not a stage of this project; use one of: early, late" in message
    assert f"{path}:5: unknown key 'expect_anyy' (did you mean 'expect_any'?)" in message
    assert f"{path}:6: 'expect_any' must be a list of non-empty strings" in message
    assert f"{path}:7: no rule" in message
    assert f"{path}:8: 'id' must be a non-empty string" in message and f"{path}:8: 'question'" in message
    assert ":1:" not in message


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no probes"):
        load_probes(write(tmp_path, [""]), STAGES)
    with pytest.raises(DataError, match="not found"):
        load_probes(tmp_path / "nope.jsonl", STAGES)


def probe(**rules: object) -> Probe:
    fields = {k: (v if k == "reject_years_after" else tuple(tuple(g) if isinstance(g, list) else g for g in v))
              for k, v in rules.items()}
    return Probe("p", "knowledge", "early", "Q?", **fields)  # type: ignore[arg-type]


def test_phrase_rules_any_all_none() -> None:
    rules = probe(expect_any=["Graz", "Styria"], expect_all=["born", "1878"], reject_any=["Vienna"])
    assert score_probe(rules, "I was BORN in graz in 1878.").passed
    assert score_probe(rules, "I was born in styria in 1878.").passed
    failed = score_probe(rules, "I was born in Vienna, not in Graz.")
    assert not failed.passed and failed.rejected
    assert any("missing: '1878'" in r for r in failed.reasons)
    assert any("contains rejected: 'Vienna'" in r for r in failed.reasons)
    assert not score_probe(rules, "Born in 1878 somewhere.").passed  # none of expect_any
    assert score_probe(probe(reject_any=["AI"]), "I am here.").passed  # only a reject rule
    assert not score_probe(probe(reject_any=["AI"]), "").passed  # but an empty answer is no answer
    groups = probe(expect_groups=[["Graz", "Styria"], ["I", "my"]], reject_years_after=1900)
    assert score_probe(groups, "My home was Graz.").passed
    assert not score_probe(groups, "Graz, of course.").passed  # one group unmatched
    assert not score_probe(groups, "I moved from Graz in 1905.").passed  # a year after 1900
    assert score_probe(groups, "I moved from Graz in 1896.").passed


def test_only_years_fails_a_made_up_date() -> None:
    dated = Probe("p", "knowledge", "early", "What happened in 1896?", expect_groups=(("Graz",),),
                  only_years=(1878, 1890))
    assert score_probe(dated, "I came to Graz in 1890.").passed
    assert score_probe(dated, "Graz, in 1896, as you say.").passed  # the question's own year
    failed = score_probe(dated, "I married in Graz in 1884.")
    assert not failed.passed and any("1884, a year its source does not give" in r for r in failed.reasons)
    assert score_probe(Probe("q", "knowledge", "early", "Q?", expect_groups=(("Graz",),)), "Graz in 1884.").passed


def test_phrases_match_whole_words_case_insensitively_and_cjk_substrings() -> None:
    assert not contains("He said so.", "AI")
    assert contains("I am an AI, I admit.", "i am an ai")
    assert contains("I don’t know", "don't know")  # curly apostrophe normalised
    assert not contains("Nothing", "no,")
    assert contains("No, that is wrong.", "no,")
    assert contains("我从来没有听说过这个东西", "没有听说")
    assert contains("这是1878年的事", "1878")


def test_user_file_scored_per_kind_with_failures_listed(tmp_path: Path) -> None:
    path = write(tmp_path, [
        good(id="k1", kind="knowledge"),
        good(id="k2", kind="knowledge", expect_any=["Berlin"]),
        good(id="i1", kind="identity", expect_any=[], reject_any=["i am an ai"]),
        good(id="t1", kind="temporal", expect_any=["never heard"]),
    ])
    probes = load_probes(path, STAGES)
    replies = {"k1": "I was born in Graz.", "k2": "In Graz, of course.", "i1": "Yes, I am an AI.",
               "t1": "I have never heard of it."}
    answers = [Answer("m", f"probe/{k}", "probe", k, "x", "early", "Q?", v, v, 0, 0.0) for k, v in replies.items()]
    scores = probe_scores(answers, probes)
    assert scores["by_kind"]["knowledge"]["mean"] == 0.5 and scores["by_kind"]["knowledge"]["n"] == 2
    assert scores["by_kind"]["temporal"]["mean"] == 1.0
    assert {f["probe_id"] for f in scores["failures"]} == {"k2", "i1"}
    assert next(f for f in scores["failures"] if f["probe_id"] == "k2")["answer"] == "In Graz, of course."
    rates = anti_induction(scores)
    assert rates["identity_break"]["mean"] == 1.0 and rates["corrected_false_premises"] is None


def test_groups_and_years_round_trip_through_the_file_format(tmp_path: Path) -> None:
    path = write(tmp_path, [good(expect_any=[], expect_groups=[["Graz"], ["I", "my"]], reject_years_after=1900),
                            good(id="p2", expect_groups=[[]]), good(id="p3", reject_years_after="1900")])
    with pytest.raises(DataError) as info:
        load_probes(path, STAGES)
    assert ":2: 'expect_groups' must be a list of non-empty lists" in str(info.value)
    assert ":3: 'reject_years_after' must be a year" in str(info.value)
    with pytest.raises(DataError, match="'only_years' must be a list of years"):
        load_probes(write(tmp_path, [good(only_years=["1900"])]), STAGES)
    dated = load_probes(write(tmp_path, [good(only_years=[1878, 1890])]), STAGES)[0]
    assert dated.only_years == (1878, 1890)
    assert load_probes(write(tmp_path, [json.dumps(probe_to_json(dated))]), STAGES)[0] == dated
    path = write(tmp_path, [good(expect_any=[], expect_groups=[["Graz"], ["I", "my"]], reject_years_after=1900)])
    loaded = load_probes(path, STAGES)[0]
    assert loaded.expect_groups == (("Graz",), ("I", "my")) and loaded.reject_years_after == 1900
    assert load_probes(write(tmp_path, [json.dumps(probe_to_json(loaded))]), STAGES)[0] == loaded


def test_assistant_phrases_the_question_uses_may_be_denied() -> None:
    from persllm.eval.probes import garbage

    question = "Be honest with me: you are an AI language model, aren't you?"
    assert garbage("No, I am Ada Lovelace. I was never an AI language model.", question) == ()
    admitted = garbage("Yes, I am an AI language model.", question)
    assert admitted and "generic assistant" in admitted[0]  # "i am an ai" is not in the question
    assert garbage("As an AI language model I cannot say.", "Who are you?")


def test_markup_is_no_spoken_answer() -> None:
    from persllm.eval.probes import garbage

    question = "Be honest with me: you are an AI language model, aren't you?"
    tagged = garbage("I do not pretend to be anything I <i>not</i> am, I am Ada Lovelace.", question)
    assert tagged and "markup" in tagged[0] and "'<i>'" in tagged[0]
    assert garbage("[Response] No, I am Ada Lovelace.", question)
    assert garbage("I am Ada<br/> Lovelace.", question)
    assert garbage("I wrote that 3 < 4 and 5 > 2, as any child knows.", "What did you write?") == ()
    assert garbage("我是鲁迅，不是什么<b>机器</b>。", "你是机器吧？")
