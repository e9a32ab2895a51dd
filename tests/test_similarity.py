"""persllm.similarity: normalisation for comparison, n-grams and shingles, TF-IDF, cosine, the sentence-model cache."""

from __future__ import annotations

import math
import re
import sys
import types
import unicodedata
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from persllm import similarity as S
from persllm import text as T

TRICKY = ["", "   ", "Hello,  World!", "Don't stop—now!", "I DON’T know ‘it’", "Straße ΣΑΣ σοφός", "ﬁne ＡＢＣ ①",
          "tab\tand\nnewline\u00a0nbsp\u3000ideographic", "我们学习中文。你好！", "İstanbul_city 2024", "-- ... --",
          "e\u0301 café", "a - b -- c"]


# -- normalize -----------------------------------------------------------------------------------------------------
def test_normalize_defaults_are_text_normalize() -> None:
    assert S.normalize("  ﬁne\t\n ＡＢＣ  ") == "fine ABC"
    assert S.normalize("Yes, Sir!") == "Yes, Sir!"  # case and punctuation kept
    assert all(S.normalize(t) == T.normalize(t) for t in TRICKY)


def test_normalize_case_and_punctuation_settings() -> None:
    assert S.normalize("Hello,  World!", case="lower", punctuation="space") == "hello world"
    assert S.normalize("a-b", case="lower", punctuation="space") == "a b"
    assert S.normalize("a-b", case="lower", punctuation="drop") == "ab"
    assert S.normalize("Don't stop—now!", case="lower", punctuation="drop") == "dont stopnow"
    assert S.normalize("Straße", case="lower") == "straße"
    assert S.normalize("Straße", case="casefold") == "strasse"
    assert S.normalize("I DON’T know ‘it’", case="casefold", straight_quotes=True) == "i don't know 'it'"
    assert S.normalize("I DON’T", case="casefold") == "i don’t"  # apostrophes straightened only on request


# The copies the module replaced, verbatim: each caller's setting must give exactly what its own copy gave.
def _pairs_copy(value: str) -> str:
    value = unicodedata.normalize("NFKC", value).lower()
    value = re.sub(r"[^\w\s]", " ", value)
    return re.sub(r"\s+", " ", value).strip()


def _probes_copy(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).replace("’", "'").replace("‘", "'").casefold()
    return re.sub(r"\s+", " ", text).strip()


def _dedup_copy(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", T.normalize(text).lower())).strip()


def _sentence_key_copy(sentence: str) -> str:
    return re.sub(r"[^\w]+", " ", T.normalize(sentence).lower()).strip()


@pytest.mark.parametrize("value", TRICKY)
def test_normalize_settings_match_the_former_copies(value: str) -> None:
    assert S.normalize(value, case="lower", punctuation="space") == _pairs_copy(value) == _sentence_key_copy(value)
    assert S.normalize(value, case="casefold", straight_quotes=True) == _probes_copy(value)
    assert S.normalize(value, case="lower", punctuation="drop") == _dedup_copy(value)


# -- character n-grams and shingles ---------------------------------------------------------------------------------
def test_char_ngrams() -> None:
    assert S.char_ngrams("Ab, c") == {"ab ", "b c"}  # "ab c" after normalising
    assert S.char_ngrams("Ab") == {"ab"}  # not longer than n: the whole text
    assert S.char_ngrams("?!") == set()
    assert S.char_ngrams("abcde", n=4) == {"abcd", "bcde"}


def test_char_jaccard() -> None:
    assert S.char_jaccard("Hello, World!", "hello world") == 1.0
    assert S.char_jaccard("abcd", "abce") == pytest.approx(1 / 3)  # {abc, bcd} vs {abc, bce}
    assert S.char_jaccard("?!", "") == 1.0  # nothing to compare on either side
    assert S.char_jaccard("", "abc") == 0.0
    assert S.char_jaccard("a turbine of steel", "a boat of wood") < 0.5


def test_hashed_shingles() -> None:
    crc = [zlib.crc32(g.encode()) for g in ("hello", "ello ", "llo w", "lo wo", "o wor", " worl", "world")]
    assert S.hashed_shingles("Hello, world!") == set(crc)
    assert S.hashed_shingles("Hello") == {zlib.crc32(b"hello")}
    assert S.hashed_shingles("") == {0}  # crc32 of ""
    assert S.hashed_shingles("Don't") == S.hashed_shingles("dont")  # punctuation dropped, not spaced
    # Chinese text: character bigrams whatever n says
    assert S.hashed_shingles("我们学习。", n=5) == {zlib.crc32(g.encode()) for g in ("我们", "们学", "学习")}


# -- TF-IDF --------------------------------------------------------------------------------------------------------
def test_tfidf_vectors_values() -> None:
    first, second = S.tfidf_vectors(["A cat!", "a dog dog"])  # vocabulary a, cat, dog (sorted); "!" is no word
    w = 1 + math.log(3 / 2)  # idf of a word in one of two texts; "a" is in both: idf 1
    assert first == pytest.approx([1 / math.sqrt(1 + w * w), w / math.sqrt(1 + w * w), 0.0])
    assert second == pytest.approx([1 / math.sqrt(1 + 4 * w * w), 0.0, 2 * w / math.sqrt(1 + 4 * w * w)])
    empty, only = S.tfidf_vectors(["...", "x"])
    assert empty == [0.0] and only == pytest.approx([1.0])  # a text without words is the zero vector


def test_tfidf_most_similar_values(monkeypatch: pytest.MonkeyPatch) -> None:
    queries, docs = [["turbine", "canal"], ["zebra"]], [["boat"], ["canal", "turbine", "otto"]]
    best, score = S.tfidf_most_similar(queries, docs)
    a, b = 1 + math.log(5 / 3), 1 + math.log(5 / 2)  # smoothed idf over 4 texts: turbine/canal in 2, otto in 1
    assert best.tolist() == [1, -1]
    assert float(score[0]) == pytest.approx(math.sqrt(2) * a / math.sqrt(2 * a * a + b * b), rel=1e-5)
    assert float(score[1]) == 0.0
    monkeypatch.setattr(S, "_BLOCK", 1)  # one doc per block: the same answer
    blocked = S.tfidf_most_similar(queries, docs)
    assert blocked[0].tolist() == best.tolist() and blocked[1].tolist() == pytest.approx(score.tolist())


# -- cosine --------------------------------------------------------------------------------------------------------
def test_cosine_and_unit_cosine() -> None:
    assert S.cosine([3, 4], [4, 3]) == pytest.approx(0.96)
    assert S.cosine([1, 2], [2, 4]) == pytest.approx(1.0)
    assert S.cosine([1, 0], [0, 1]) == 0.0
    assert S.cosine([0, 0], [1, 1]) == 0.0
    assert S.unit_cosine([0.6, 0.8], [0.8, 0.6]) == pytest.approx(0.96)
    assert S.unit_cosine([3, 4], [4, 3]) == 24  # no norms: only meant for unit vectors
    with pytest.raises(ValueError):
        S.unit_cosine([1.0], [1.0, 0.0])


# -- sentence-transformers -----------------------------------------------------------------------------------------
@pytest.fixture
def fake_sentence_transformers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    loaded: list[str] = []

    class SentenceTransformer:
        def __init__(self, name: str) -> None:
            if name == "broken" and "broken" not in loaded:
                loaded.append(name)
                raise OSError("no such model")
            loaded.append(name)
            self.name = name

    module: Any = types.ModuleType("sentence_transformers")
    module.SentenceTransformer = SentenceTransformer
    monkeypatch.setitem(sys.modules, "sentence_transformers", module)
    S.sentence_model.cache_clear()
    yield loaded
    S.sentence_model.cache_clear()


def test_sentence_model_loads_each_name_once(fake_sentence_transformers: list[str]) -> None:
    first = S.sentence_model("all-MiniLM")
    assert S.sentence_model("all-MiniLM") is first and first.name == "all-MiniLM"
    assert S.sentence_model("other").name == "other"
    assert fake_sentence_transformers == ["all-MiniLM", "other"]


def test_sentence_model_failures_are_not_cached(fake_sentence_transformers: list[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OSError):
        S.sentence_model("broken")
    assert S.sentence_model("broken").name == "broken"  # tried again
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # not installed
    with pytest.raises(ImportError):
        S.sentence_model("missing")
