"""How alike two texts are, in one place: text normalised for comparison, character n-grams and hashed shingles,
TF-IDF vectors and nearest neighbours, cosine similarity, and the sentence-transformers models (loaded once).

Where two callers compare differently, the difference is a parameter or a second function with its own name, so
each keeps its exact results: `normalize` takes the case and punctuation handling, `char_ngrams` and
`hashed_shingles` cut different normalisations into different grams, `tfidf_vectors` (pure Python, small sets)
and `tfidf_most_similar` (numpy float32, large pools) weigh words alike over different vocabularies, and
`unit_cosine` skips the norms `cosine` divides by.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from persllm import text as T

if TYPE_CHECKING:
    import numpy as np

_PUNCTUATION = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")
_BLOCK = 2048  # doc rows per similarity block in tfidf_most_similar, bounding memory at n_queries x 2048 floats


# -- normalisation ---------------------------------------------------------------------------------------------
def normalize(value: str, *, case: Literal["keep", "lower", "casefold"] = "keep",
              punctuation: Literal["keep", "space", "drop"] = "keep", straight_quotes: bool = False) -> str:
    """Text as compared: NFKC with single spaces (text.normalize), then optionally curly apostrophes made straight,
    case lowered or case-folded, and punctuation turned into spaces or dropped; spaces collapsed again at the end.

    The callers' settings: DPO pair answers and repeated sentences `case="lower", punctuation="space"`; question
    dedup shingles `case="lower", punctuation="drop"` ("don't" -> "dont"); probe phrase matching
    `case="casefold", straight_quotes=True` (punctuation kept).
    """
    value = T.normalize(value)
    if straight_quotes:
        value = value.replace("’", "'").replace("‘", "'")
    if case == "lower":
        value = value.lower()
    elif case == "casefold":
        value = value.casefold()
    if punctuation == "space":
        value = _PUNCTUATION.sub(" ", value)
    elif punctuation == "drop":
        value = _PUNCTUATION.sub("", value)
    return _SPACES.sub(" ", value).strip()


# -- character n-grams -----------------------------------------------------------------------------------------
def _windows(flat: str, n: int) -> list[str]:
    """Every n-character window of `flat`; the whole of it when it is not longer than n."""
    if len(flat) <= n:
        return [flat]
    return [flat[i:i + n] for i in range(len(flat) - n + 1)]


def char_ngrams(value: str, n: int = 3) -> set[str]:
    """Character n-grams of the lowercased text with punctuation as spaces (works for English and Chinese alike);
    empty for a text with no letters or digits."""
    norm = normalize(value, case="lower", punctuation="space")
    return set(_windows(norm, n)) if norm else set()


def char_jaccard(a: str, b: str) -> float:
    """Jaccard similarity of character 3-grams: 1.0 for the same text up to case, spacing and punctuation."""
    grams_a, grams_b = char_ngrams(a), char_ngrams(b)
    if not grams_a and not grams_b:
        return 1.0
    return len(grams_a & grams_b) / len(grams_a | grams_b)


def hashed_shingles(text: str, n: int = 5) -> set[int]:
    """Hashed (crc32) character n-grams of the lowercased words, punctuation dropped: MinHash input.

    Character shingles suit short questions: changing one word only touches the n-grams around it, whereas word
    trigrams of a ten-word question would mostly change; they also work for Chinese without segmentation. An empty
    text is one shingle (the hash of "").
    """
    flat = normalize(text, case="lower", punctuation="drop")
    if T.is_cjk(flat):
        n = 2  # a Chinese character carries about a word's worth of meaning: character bigrams are the norm
    return {zlib.crc32(gram.encode()) for gram in _windows(flat, n)}


# -- TF-IDF ----------------------------------------------------------------------------------------------------
def tfidf_vectors(texts: Sequence[str]) -> list[list[float]]:
    """L2-normalised TF-IDF vectors (smoothed idf) over persllm's language-aware word tokens, as plain float lists.

    Pure Python, over the vocabulary of all `texts`: meant for a few dozen texts (a conversation's turns).
    """
    docs = [[w for w in (t.lower() for t in T.tokens(text)) if any(c.isalnum() for c in w)] for text in texts]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    df = [0] * len(vocab)
    for doc in docs:
        for word in set(doc):
            df[vocab[word]] += 1
    idf = [math.log((1 + len(docs)) / (1 + n)) + 1 for n in df]
    vectors = []
    for doc in docs:
        row = [0.0] * len(vocab)
        for word in doc:
            row[vocab[word]] += idf[vocab[word]]
        norm = math.sqrt(sum(x * x for x in row)) or 1.0
        vectors.append([x / norm for x in row])
    return vectors


def tfidf_most_similar(queries: Sequence[Sequence[str]],
                       docs: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Index and cosine similarity of the best doc for each query, on TF-IDF vectors (-1 where nothing overlaps).

    Takes word lists (the callers tokenize). The idf (smoothed, as tfidf_vectors') counts queries and docs; the
    vocabulary is the queries' words: other words cannot add to a dot product, they only enter the doc norms. numpy
    float32, docs scored in blocks, so memory stays at (queries x block) whatever the pool size.
    """
    import numpy as np

    vocab: dict[str, int] = {}
    for words in queries:
        for word in words:
            vocab.setdefault(word, len(vocab))
    n_docs = len(docs) + len(queries)
    df = Counter(w for words in list(queries) + list(docs) for w in set(words))
    idf = {w: math.log((1 + n_docs) / (1 + c)) + 1.0 for w, c in df.items()}
    q_matrix = _tfidf_rows(queries, vocab, idf)
    best = np.full(len(queries), -1, dtype=np.int64)
    score = np.zeros(len(queries), dtype=np.float32)
    for start in range(0, len(docs), _BLOCK):
        block = _tfidf_rows(docs[start:start + _BLOCK], vocab, idf)
        sims = q_matrix @ block.T
        arg = sims.argmax(axis=1)
        top = sims[np.arange(len(queries)), arg]
        better = top > score
        best[better] = arg[better] + start
        score[better] = top[better]
    return best, score


def _tfidf_rows(rows: Sequence[Sequence[str]], vocab: dict[str, int], idf: dict[str, float]) -> np.ndarray:
    """L2-normalised TF-IDF rows over `vocab`; the norm counts every word, in the vocabulary or not."""
    import numpy as np

    matrix = np.zeros((len(rows), max(1, len(vocab))), dtype=np.float32)
    for i, words in enumerate(rows):
        counts = Counter(words)
        weights = {w: c * idf.get(w, 1.0) for w, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in weights.values())) or 1.0
        for word, weight in weights.items():
            column = vocab.get(word)
            if column is not None:
                matrix[i, column] = weight / norm
    return matrix


# -- cosine ----------------------------------------------------------------------------------------------------
def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors (0 when either is all zeros)."""
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def unit_cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two unit-length (or zero) vectors of one length: their dot product, no norms taken."""
    return sum(x * y for x, y in zip(a, b, strict=True))


# -- sentence embeddings ---------------------------------------------------------------------------------------
@functools.cache
def sentence_model(name: str) -> Any:
    """The sentence-transformers model `name`, loaded once per process (loading is the slow part).

    Raises ImportError when sentence-transformers is not installed (each caller says what that costs it); a model
    that fails to load is not cached, so the next call tries again.
    """
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name)
