"""IPIP-NEO-120 scoring against hand-computed scores, and the one-pass log-likelihood administration."""

from __future__ import annotations

import pytest

from persllm.eval import ipip

EN = ipip.items("en")


def answers(rule) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {item.id: rule(item) for item in EN}


# Keyed items per domain in IPIP-NEO-120, counted by hand from the item list:
# O 12 plus / 12 minus, C 11/13, E 18/6, A 7/17, N 17/7.
ALL_FIVES = {"O": 12 * 5 + 12 * 1, "C": 11 * 5 + 13 * 1, "E": 18 * 5 + 6 * 1, "A": 7 * 5 + 17 * 1, "N": 17 * 5 + 7 * 1}
ALL_ONES = {"O": 12 * 1 + 12 * 5, "C": 11 * 1 + 13 * 5, "E": 18 * 1 + 6 * 5, "A": 7 * 1 + 17 * 5, "N": 17 * 1 + 7 * 5}


def test_inventory_shape_and_translation() -> None:
    assert len(EN) == 120
    zh = ipip.items("zh")
    assert [(i.id, i.keyed, i.domain, i.facet) for i in zh] == [(i.id, i.keyed, i.domain, i.facet) for i in EN]
    for domain in ipip.DOMAINS:
        assert sum(1 for i in EN if i.domain == domain) == 24
        for facet in range(1, 7):
            assert sum(1 for i in EN if i.domain == domain and i.facet == facet) == 4


def test_all_fives_and_all_ones_match_hand_computed_domain_sums() -> None:
    assert ipip.score(answers(lambda i: 5), EN)["domain_sum"] == pytest.approx(ALL_FIVES)
    assert ipip.score(answers(lambda i: 1), EN)["domain_sum"] == pytest.approx(ALL_ONES)
    assert ALL_FIVES == {"O": 72, "C": 68, "E": 96, "A": 52, "N": 92}  # the arithmetic above, spelled out


def test_keyed_extremes_span_24_to_120() -> None:
    high = ipip.score(answers(lambda i: 5 if i.keyed == "plus" else 1), EN)
    low = ipip.score(answers(lambda i: 1 if i.keyed == "plus" else 5), EN)
    assert set(high["domain_sum"].values()) == {120} and set(high["facet_sum"].values()) == {20}
    assert set(low["domain_sum"].values()) == {24} and set(low["facet_sum"].values()) == {4}
    assert set(high["domain_mean"].values()) == {5.0}
    neutral = ipip.score(answers(lambda i: 3), EN)
    assert set(neutral["domain_sum"].values()) == {72} and set(neutral["facet_sum"].values()) == {12}


def test_facets_with_reverse_keying() -> None:
    fives = ipip.score(answers(lambda i: 5), EN)["facet_sum"]
    assert fives["N1"] == 20  # Anxiety: four plus items
    assert fives["A5"] == 4  # Modesty: four minus items ("Think highly of myself", ...)
    assert fives["A1"] == 5 + 5 + 5 + 1  # Trust: three plus, "Distrust people" minus
    assert fives["O4"] == 5 + 1 + 1 + 1  # Adventurousness: "Prefer variety to routine" plus, three minus


def test_hand_picked_trust_facet_vector() -> None:
    # File order of facet A1: Trust others (+), Believe that others have good intentions (+),
    # Trust what people say (+), Distrust people (-). Answers 4, 2, 5, 1 -> 4 + 2 + 5 + (6 - 1) = 16.
    a1 = [i for i in EN if i.domain == "A" and i.facet == 1]
    assert [i.keyed for i in a1] == ["plus", "plus", "plus", "minus"]
    given = dict(zip([i.id for i in a1], [4, 2, 5, 1]))
    result = ipip.score(answers(lambda i: given.get(i.id, 3)), EN)
    assert result["facet_sum"]["A1"] == 16
    assert result["domain_sum"]["A"] == 16 + 20 * 3


def test_alternating_answers_within_facets() -> None:
    order: dict[str, int] = {}
    vector = {}
    for item in EN:  # 5, 1, 5, 1 in file order within each facet
        key = f"{item.domain}{item.facet}"
        vector[item.id] = 5 if order.get(key, 0) % 2 == 0 else 1
        order[key] = order.get(key, 0) + 1
    facets = ipip.score(vector, EN)["facet_sum"]
    assert facets["N1"] == 5 + 1 + 5 + 1  # all plus
    assert facets["A5"] == 1 + 5 + 1 + 5  # all minus: reversed
    assert facets["A1"] == 5 + 1 + 5 + 5  # plus, plus, plus, minus(1 -> 5)
    assert facets["O4"] == 5 + 5 + 1 + 5  # plus, minus(1 -> 5), minus(5 -> 1), minus(1 -> 5)


def test_missing_items_leave_sums_out_but_keep_means() -> None:
    partial = answers(lambda i: 5 if i.keyed == "plus" else 1)
    del partial[EN[0].id]
    result = ipip.score(partial, EN)
    assert result["domain_sum"] is None and result["facet_sum"] is None
    assert result["answered"] == 119
    assert result["domain_mean"]["N"] == 5.0


def test_item_score_and_statements() -> None:
    item = EN[0]
    assert ipip.item_score(item, 4) == 4
    minus = next(i for i in EN if i.keyed == "minus")
    assert ipip.item_score(minus, 4) == 2
    with pytest.raises(ValueError, match="1-5"):
        ipip.item_score(item, 6)
    party = next(i for i in EN if i.text.startswith("Am "))
    assert ipip.statement(party, "en").startswith("I am ")
    assert ipip.statement(EN[0], "en") == "I worry about things."
    assert ipip.interview_question(party, "en").count("You are") == 1


def test_choice_helpers() -> None:
    choice, probs = ipip.choices_from_logprobs([-3.0, -1.0, -0.2, -4.0, -5.0])
    assert choice == 3 and sum(probs) == pytest.approx(1.0)
    # Every row prefers "1"; after calibration, what each item changes decides.
    # Option means: 1 -0.1, 2 -2.67, 3 -3, 4 -3, 5 -3.33; deltas pick 5, then a tie won by the first (1), then 2.
    rows = [[-0.1, -3.0, -3.0, -3.0, -2.0], [-0.1, -3.0, -3.0, -3.0, -4.0], [-0.1, -2.0, -3.0, -3.0, -4.0]]
    assert [ipip.choices_from_logprobs(r)[0] for r in rows] == [1, 1, 1]
    assert ipip.calibrated_choices(rows) == [5, 1, 2]
    assert ipip.parse_choice("4") == 4 and ipip.parse_choice("I'd say 4, maybe 4.") == 4
    assert ipip.parse_choice("between 2 and 4") is None and ipip.parse_choice("no idea") is None
    assert ipip.parse_choice("12 years") is None


def test_interview_items_spread_over_facets() -> None:
    chosen = ipip.interview_items("en", 30)
    assert len({(i.domain, i.facet) for i in chosen}) == 30


def test_loglik_administration_is_one_batched_forward(tiny_model, project_dir) -> None:  # type: ignore[no-untyped-def]
    from persllm.backends.hf import HFBackend
    from persllm.config import load_project
    from persllm.eval.generate import Decoding, ModelUnderTest
    from persllm.eval.runner import Persona, Plan, administer
    from persllm.progress import NULL

    project = load_project(project_dir, overrides=[f"base_model=hf:{tiny_model}"])
    backend = HFBackend(tiny_model)
    calls: list[int] = []
    forward = backend.model.forward

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(int(kwargs["input_ids"].shape[0]))
        return forward(*args, **kwargs)

    backend.model.forward = counting
    plan = Plan(probes=[], heldout=[], words=[], ipip_stages=["early"], interview=[],
                decoding=Decoding(8, 0.7, 0))
    model = ModelUnderTest("base", "base", "tiny", local=True)
    result = administer(Persona(project.slug, project), "early", model, backend, plan, NULL)
    assert calls.count(120) == 1 and all(c in (1, 120) for c in calls) and len(calls) <= 2
    assert result["method"] == "loglik" and len(result["answers"]) == 120
    assert set(result["answers"].values()) <= {1, 2, 3, 4, 5}
    scored = ipip.score(result["answers"], EN)
    assert all(24 <= v <= 120 for v in scored["domain_sum"].values())
