"""BLEU, ROUGE-L (English and Chinese), perplexity and confidence intervals."""

from __future__ import annotations

import math

import pytest

from persllm.eval.criteria.distinction import distinction
from persllm.eval.generate import Answer
from persllm.eval.metrics import mean_ci, perplexity, rate_ci, rouge_l, sentence_bleu, symmetric_bleu, tokens
from persllm.types import Sample

PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat today", "a cat was sitting on the mat"),
    ("I wrote long letters to my mother", "I wrote long and lively letters to my mother and to Babbage"),
    ("engines", "the analytical engine weaves algebraic patterns"),
    ("nothing in common here", "completely different words entirely"),
    ("我从来没有听说过这个东西", "我没有听说过这种东西"),
]


@pytest.mark.parametrize(("hyp", "ref"), PAIRS)
def test_bleu_equals_sacrebleu_on_the_same_tokens(hyp: str, ref: str) -> None:
    import sacrebleu  # a dev dependency: the reference implementation BLEU is checked against

    expected = sacrebleu.sentence_bleu(" ".join(tokens(hyp)), [" ".join(tokens(ref))], tokenize="none").score
    assert sentence_bleu(hyp, ref) == pytest.approx(expected, abs=1e-6)


def test_bleu_sanity() -> None:
    assert sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert sentence_bleu("nothing in common", "completely different words") == 0.0
    assert sentence_bleu("", "anything") == 0.0
    assert 0 < sentence_bleu("我从来没有听说过", "我没有听说过") < 100  # Chinese works character by character
    assert symmetric_bleu("a b c d e", "a b c x y") == pytest.approx(
        (sentence_bleu("a b c d e", "a b c x y") + sentence_bleu("a b c x y", "a b c d e")) / 2)


def test_rouge_l_by_hand() -> None:
    # LCS of "the cat sat on the mat" and "the cat was on a mat" is "the cat on mat" (4 tokens).
    p, r = 4 / 6, 4 / 6
    assert rouge_l("the cat sat on the mat", "the cat was on a mat") == pytest.approx(
        (1 + 1.2**2) * p * r / (r + 1.2**2 * p))
    assert rouge_l("same words", "Same words") == pytest.approx(1.0)
    assert rouge_l("abc", "xyz") == 0.0
    # Chinese: LCS of 我喜欢数学 and 我非常喜欢诗歌 is 我喜欢 (3 characters).
    p, r = 3 / 5, 3 / 7
    assert rouge_l("我喜欢数学", "我非常喜欢诗歌") == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))


def test_perplexity_and_intervals() -> None:
    assert perplexity(-10 * math.log(4), 10) == pytest.approx(4.0)
    assert perplexity(0.0, 0) is None
    estimate = mean_ci([1.0, 2.0, 3.0])
    assert estimate.mean == 2.0 and estimate.low == pytest.approx(2.0 - 4.303 * 1.0 / math.sqrt(3), abs=1e-3)
    assert mean_ci([5.0]).low is None and mean_ci([]).mean is None
    wilson = rate_ci(8, 10)
    assert wilson.mean == 0.8 and wilson.low == pytest.approx(0.4902, abs=1e-3) and wilson.high == pytest.approx(
        0.9433, abs=1e-3)
    assert rate_ci(0, 0).mean is None


def answer(key: str, text: str) -> Answer:
    return Answer("m", key, key.split("/")[0], key.split("/")[1], "p", "early", "Q?", text, text, 0, 0.7)


def test_distinction_intra_stage_inter_and_embeddings() -> None:
    sample = Sample("s1", "p", "early", "1900", "ordinary", "Q?", "", "R.", "seed", split="test")
    answers = [answer("sample/s1/early/1", "I built a turbine by the canal"),
               answer("sample/s1/early/2", "I built a turbine by the canal"),
               answer("other_stage/s1/late", "I ran a factory in Berlin"),
               answer("peer/s1/marie", "I studied radium in Paris")]
    result = distinction(answers, [sample], ["marie", "nobody"],
                         embed=lambda texts: [[1.0, float("turbine" in t)] for t in texts])
    bleu = result["bleu"]["overall"]
    assert bleu["intra"]["mean"] == pytest.approx(100.0)
    assert bleu["stage"]["mean"] < 100 and bleu["inter"]["n"] == 1
    assert result["bleu"]["by_stage"]["early"]["intra"]["n"] == 1
    emb = result["embedding"]["overall"]
    assert emb["intra"]["mean"] == pytest.approx(1.0) and emb["inter"]["mean"] < 1.0
    assert distinction([], [sample], [])["bleu"]["overall"]["intra"]["mean"] is None
