"""Retrieval over one stage's passages (BM25, or a sentence-transformers model) and the method's context assembly."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from persllm import text as T
from persllm.errors import DependencyError
from persllm.similarity import sentence_model
from persllm.types import Passage

SEPARATOR = " ... "


@dataclass(frozen=True)
class Context:
    """Retrieved material for one question: knowledge and style blocks with the passage ids they came from."""

    knowledge: str
    style: str
    knowledge_ids: tuple[str, ...]
    style_ids: tuple[str, ...]

    @property
    def ids(self) -> tuple[str, ...]:
        """All passage ids, knowledge first."""
        return self.knowledge_ids + self.style_ids


class BM25:
    """Okapi BM25 over content words (CJK characters count as words, so Chinese works without segmentation)."""

    def __init__(self, passages: Sequence[Passage], k1: float = 1.5, b: float = 0.75) -> None:
        self.passages = list(passages)
        self.docs = [Counter(T.content_words(p.text)) for p in self.passages]
        lengths = np.array([sum(d.values()) for d in self.docs], dtype=float)
        self.avgdl = float(lengths.mean()) if len(lengths) else 1.0
        self.lengths = lengths
        df: Counter[str] = Counter()
        for doc in self.docs:
            df.update(doc.keys())
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for the query."""
        terms = Counter(T.content_words(query))
        out = np.zeros(len(self.docs))
        norm = self.k1 * (1 - self.b + self.b * self.lengths / max(self.avgdl, 1e-9))
        for term in terms:
            idf = self.idf.get(term)
            if idf is None:
                continue
            tf = np.array([doc.get(term, 0) for doc in self.docs], dtype=float)
            out += idf * tf * (self.k1 + 1) / (tf + norm)
        return out


class Embeddings:
    """Cosine similarity with a sentence-transformers model (loaded once, passages encoded in one batch)."""

    def __init__(self, passages: Sequence[Passage], model_name: str) -> None:
        try:
            self.model = sentence_model(model_name)  # loaded once per process, however many stages rank with it
        except ImportError as exc:
            raise DependencyError("construct.embedding_model needs sentence-transformers: "
                                  "pip install sentence-transformers") from exc
        self.passages = list(passages)
        self.matrix = self.model.encode([p.text for p in self.passages], normalize_embeddings=True,
                                        batch_size=64, convert_to_numpy=True)

    def scores(self, query: str) -> np.ndarray:
        """Cosine similarity of every passage to the query."""
        vector = self.model.encode([query], normalize_embeddings=True, convert_to_numpy=True)[0]
        return self.matrix @ vector


class Retriever:
    """Ranks one stage's passages for a query and assembles the method's knowledge + style context."""

    def __init__(self, passages: Sequence[Passage], embedding_model: str = "") -> None:
        self.passages = list(passages)
        self.by_id = {p.id: p for p in self.passages}
        self.ranker: BM25 | Embeddings = Embeddings(passages, embedding_model) if embedding_model else BM25(passages)
        self.idf = self.ranker.idf if isinstance(self.ranker, BM25) else BM25(passages).idf

    def rank(self, query: str, kind: str | None = None) -> list[Passage]:
        """Passages of `kind` (or all) ordered from most to least relevant (stable for ties)."""
        scores = self.ranker.scores(query)
        order = sorted(range(len(self.passages)), key=lambda i: (-scores[i], i))
        return [self.passages[i] for i in order if kind is None or self.passages[i].kind == kind]

    def context(self, seed: Passage, query: str, knowledge_budget: int, style_budget: int,
                exclude: frozenset[str] = frozenset()) -> Context:
        """Seed passage first, then the best other passages (not in `exclude`) until each token budget is reached."""
        knowledge, k_ids = self._fill(seed, query, "knowledge", knowledge_budget, exclude)
        style, s_ids = self._fill(seed, query, "style", style_budget, exclude)
        return Context(knowledge, style, k_ids, s_ids)

    def _fill(self, seed: Passage, query: str, kind: str, budget: int,
              exclude: frozenset[str]) -> tuple[str, tuple[str, ...]]:
        chosen: list[Passage] = [seed] if seed.kind == kind else []
        used = sum(T.count_tokens(p.text) for p in chosen)
        for passage in self.rank(f"{query} {seed.text}", kind):
            if passage.id == seed.id or passage.id in exclude or any(passage.text in c.text for c in chosen):
                continue
            cost = T.count_tokens(passage.text)
            if used + cost > budget:
                if used == 0:  # a single passage longer than the budget is cut, never dropped
                    chosen.append(passage)
                    used = budget
                break
            chosen.append(passage)
            used += cost
        texts = [T.truncate_tokens(p.text, budget) for p in chosen]
        return SEPARATOR.join(texts), tuple(p.id for p in chosen)
