"""The recipe benchmark's bookkeeping: candidates, a report's summary, paired comparisons and the Markdown table."""

from __future__ import annotations

import pytest
from benchmarks import recipe


def report(passes: dict[str, list[bool]]) -> dict:  # type: ignore[type-arg]
    """A minimal eval report.json with the given per-probe results."""
    from persllm.eval.criteria.probes import paired_probes
    from persllm.eval.metrics import rate_ci

    names = list(passes)
    scores = {m: {"results": {f"p{i}": v for i, v in enumerate(r)}} for m, r in passes.items()}
    return {
        "models": [{"name": m} for m in names],
        "probes": {"models": {m: {"overall": {**rate_ci(sum(r), len(r)).as_dict(), "passed": sum(r), "n": len(r)},
                                  "by_kind": {"identity": {**rate_ci(sum(r[:4]), 4).as_dict(), "passed": sum(r[:4]), "n": 4},
                                              "knowledge": {**rate_ci(sum(r[4:]), len(r) - 4).as_dict(),
                                                            "passed": sum(r[4:]), "n": len(r) - 4}},
                                  "results": scores[m]["results"]} for m, r in passes.items()},
                   "paired": paired_probes(scores, names)},
        "format": {"models": {m: {"rate": rate_ci(0, len(r)).as_dict()} for m, r in passes.items()}},
        "precision": {"perplexity": {m: {"overall": 40.0} for m in names}},
        "smoke": {"sft": {"ok": True}, "dpo": {"ok": False}},
        "timings": {"total": 1.0},
    }


def test_candidates_are_selected_by_name_and_unknown_names_refused() -> None:
    assert [c.name for c in recipe.selected("demo,cot")] == ["demo", "cot"]
    assert len(recipe.selected("")) == len(recipe.CANDIDATES)
    with pytest.raises(SystemExit, match="unknown recipe candidate"):
        recipe.selected("demo,nope")
    names = {c.name for c in recipe.CANDIDATES}
    assert all(c.reuses in names for c in recipe.CANDIDATES if c.reuses)


def test_summary_table_and_paired_difference_against_demo() -> None:
    base, better = [False] * 10, [True] * 6 + [False] * 4
    demo = recipe.summarize(report({"base": base, "sft": base, "dpo": base}), recipe.CANDIDATES[0], 600)
    other = recipe.summarize(report({"base": base, "sft": better, "dpo": better}), recipe.CANDIDATES[1], 660)
    test = recipe.versus(other, demo)
    assert test is not None and test["only_b"] == 6 and test["only_a"] == 0
    assert recipe.versus(demo, demo) is None
    table = recipe.table({"ada-lovelace": [demo, other]})
    rows = table.splitlines()
    assert len(rows) == 4 and "| ada-lovelace | cot | 0/10 / 6/10 / 6/10 |" in rows[3]
    assert "+60 [" in rows[3] and "pass / fail" in rows[3] and rows[3].endswith("| - / - | 11 | identity 4/4, knowledge 2/6 |")
    assert rows[2].endswith("| identity 0/4, knowledge 0/6 |")


def test_replicates_pool_their_paired_differences_over_seeds() -> None:
    # Each seed has its own probes: the pool concatenates each run's pairs, so n adds up and the interval narrows.
    base, three, four = [False] * 10, [True] * 3 + [False] * 7, [True] * 4 + [False] * 6
    demo = recipe.summarize(report({"base": base, "sft": base, "dpo": three}), recipe.named("demo"), 600)
    again = recipe.summarize(report({"base": base, "sft": four, "dpo": four}), recipe.named("demo-seed-7"), 600)
    cot = recipe.summarize(report({"base": base, "sft": base, "dpo": base}), recipe.named("cot"), 600)
    test = recipe.pooled([demo, again, cot], "demo")
    assert test is not None and test["n"] == 20 and test["only_b"] == 7 and test["only_a"] == 0
    one = recipe.pooled([demo], "demo")
    assert one is not None and one["difference"]["low"] < test["difference"]["low"]
    lines = recipe.pooled_lines({"ada-lovelace": [demo, again, cot]})
    sft = recipe._diff(recipe.pooled([demo, again], "demo", "sft"))
    assert lines == [f"ada-lovelace / demo over 2 seeds (n=20): SFT vs base {sft}, DPO vs base {recipe._diff(test)}"]
    assert recipe.pooled_lines({"ada-lovelace": [demo, cot]}) == []  # no replicate run: nothing to pool


def test_cpu_replicates_pool_against_the_demo_model_that_answered_their_probes() -> None:
    base, two, five = [False] * 10, [True] * 2 + [False] * 8, [True] * 5 + [False] * 5
    cpu_runs = []
    for name, reference in (("cpu", "demo"), ("cpu-seed-7", "demo-seed-7")):
        found = report({"base": base, "sft": five, "dpo": five, reference: two})
        cpu_runs.append(recipe.summarize(found, recipe.named(name), 3600, reference=reference))
    against_demo = recipe.pooled(cpu_runs, "cpu", against="reference")
    assert against_demo is not None and against_demo["n"] == 20 and against_demo["only_b"] == 6
    assert recipe.pooled_lines({"ada-lovelace": cpu_runs})[0].endswith(f", DPO vs demo's DPO {recipe._diff(against_demo)}")


def test_recalled_facts_are_names_and_years_the_question_does_not_give() -> None:
    from benchmarks import recall

    from persllm.construct import facts as F

    ref = F.persona_ref("Ada Lovelace", "en", [])
    question = "How did you spend 1833?"
    terms = recall.fact_terms(question, "In June 1833 I met the mathematician Charles Babbage at a party.", ref)
    assert terms == ["Charles Babbage"]  # 1833 is in the question: naming it back recalls nothing
    assert recall.recalled("That was the year I first met Charles Babbage, at a party in London.", question, terms)
    assert not recall.recalled("In 1833 I married William King, a young lawyer.", question, terms)
    assert not recall.recalled("Charles Babbage " * 8, question, terms)  # a loop naming the term is no answer
    zh = F.persona_ref("鲁迅", "zh", [])
    terms = recall.fact_terms("你在北京写了什么？", "一九一八年我在北京写了《狂人日记》。", zh)
    assert terms == ["狂人日记"] and recall.recalled("我写了《狂人日记》，登在《新青年》上。", "你在北京写了什么？", terms)


def test_recall_stops_on_a_failed_answer_instead_of_counting_it_a_miss() -> None:
    from benchmarks import recall

    from persllm.backends.base import Completion
    from persllm.errors import BackendError

    assert recall.answers([(1, Completion("Charles Babbage")), (0, Completion("Lady Byron"))], "sft") == \
        {0: "Lady Byron", 1: "Charles Babbage"}
    with pytest.raises(SystemExit, match="model 'dpo' failed on question 2: out of memory"):
        recall.answers([(0, Completion("Lady Byron")), (1, BackendError("out of memory"))], "dpo")


def test_a_table_row_shows_trained_fact_recall() -> None:
    base = [False] * 10
    demo = recipe.summarize(report({"base": base, "sft": base, "dpo": base}), recipe.CANDIDATES[0], 600)
    demo["recall"] = {"sft": {"passed": 2, "n": 24}, "dpo": {"passed": 3, "n": 24}}
    assert "| 2/24 / 3/24 | 10 |" in recipe.table({"lu-xun": [demo]}).splitlines()[2]
