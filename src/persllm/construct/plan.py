"""What to generate: seed passages per stage, their train/test split, and the kind of each question slot.

The split is decided here, per seed paragraph and before any generation, so no seed paragraph can serve both a
training and a test sample; it is stratified by stage and material kind and depends only on ids and the seed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from persllm.config import Project
from persllm.types import Passage, stable_id

STANCES = ("agree", "differ", "conflict")
INDUCED = ("wrong_fact", "after_time", "identity", "never_lived", "before_time")
# Reasons that say the seed cannot carry the slot's kind (no named topic to ask about, no view of the persona's, no
# sentence answering the question), not that the kind failed in general.
SEED_MISFITS = frozenset({"no_topic", "no_view", "view_not_quotable", "no_fact_for_topic", "low_relevance"})
_SECOND_KIND = {"ordinary": "opinion", "opinion": "ordinary"}


@dataclass(frozen=True)
class Slot:
    """One question to generate: from which seed, of which kind and variant, in which split."""

    id: str
    stage: str
    seed: Passage
    kind: str  # ordinary | opinion | induced
    variant: str  # opinion stance or induced subtype; "" for ordinary
    split: str  # train | test


def make_plan(project: Project, passages: Sequence[Passage]) -> list[Slot]:
    """All question slots of the project, in a deterministic order."""
    cfg = project.construct
    slots: list[Slot] = []
    for stage in project.stages:
        seeds = choose_seeds([p for p in passages if p.stage == stage.id], cfg.max_per_stage, project.seed)
        splits = split_seeds(seeds, cfg.test_fraction, project.seed)
        kinds = weighted_sequence(cfg.kinds, len(seeds) * cfg.questions_per_passage)
        counters: dict[str, int] = defaultdict(int)
        for i, seed in enumerate(seeds):
            for j in range(cfg.questions_per_passage):
                kind = kinds[i * cfg.questions_per_passage + j]
                variant = _variant(kind, counters[kind])
                counters[kind] += 1
                slot_id = f"{stage.id}-{kind[:3]}-{stable_id(project.slug, stage.id, seed.id, j, kind, length=10)}"
                slots.append(Slot(slot_id, stage.id, seed, kind, variant, splits[seed.id]))
    return slots


def second_choices(project: Project, misfits: Sequence[Slot]) -> dict[str, Slot]:
    """For slots whose seed cannot carry their kind, one slot of the other non-induced kind on the same seed.

    Induced items need no particular passage and never fail this way, so without a second try an ordinary or
    opinion slot lost on a style seed leaves induced items over-represented (51% instead of 40% on the 鲁迅 example);
    the same seed keeps the same split, so the train/test separation is unchanged.
    """
    counters: dict[tuple[str, str], int] = defaultdict(int)
    out: dict[str, Slot] = {}  # the first slot's id -> its second choice
    for slot in misfits:
        kind = _SECOND_KIND.get(slot.kind)
        if kind is None:
            continue
        variant = _variant(kind, counters[slot.stage, kind])
        counters[slot.stage, kind] += 1
        slot_id = f"{slot.stage}-{kind[:3]}-{stable_id(project.slug, slot.id, 'second', kind, length=10)}"
        out[slot.id] = Slot(slot_id, slot.stage, slot.seed, kind, variant, slot.split)
    return out


def choose_seeds(passages: Sequence[Passage], limit: int, seed: int) -> list[Passage]:
    """Seeds in file order (knowledge, then style, as the method does); with a limit, a spread over both kinds."""
    knowledge = [p for p in passages if p.kind == "knowledge"]
    style = [p for p in passages if p.kind == "style"]
    if limit <= 0 or limit >= len(passages):
        return knowledge + style
    # Interleave so a small limit still covers the persona's own words, then keep a seeded spread of each list.
    n_style = min(len(style), max(1, round(limit * len(style) / max(1, len(passages)))))
    n_know = min(len(knowledge), limit - n_style)
    return _spread(knowledge, n_know, seed) + _spread(style, limit - n_know, seed)


def _spread(items: Sequence[Passage], n: int, seed: int) -> list[Passage]:
    """n items chosen evenly across the list (not the first n), so every part of a life stage is represented."""
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    step = len(items) / n
    offset = int(stable_id(seed, len(items), length=8), 16) % max(1, int(step))
    return [items[min(len(items) - 1, int(offset + k * step))] for k in range(n)]


def split_seeds(seeds: Sequence[Passage], test_fraction: float, seed: int) -> dict[str, str]:
    """train/test per seed passage, stratified by material kind, ordered by a seeded hash of the passage id."""
    split: dict[str, str] = {}
    for kind in ("knowledge", "style"):
        group = sorted((p for p in seeds if p.kind == kind), key=lambda p: stable_id(seed, p.id))
        n_test = round(test_fraction * len(group))
        if n_test == 0 and len(group) >= 3:
            n_test = 1  # every stratum with a few seeds gets at least one held-out seed
        for i, passage in enumerate(group):
            split[passage.id] = "test" if i < n_test else "train"
    return split


def weighted_sequence(weights: dict[str, float], length: int) -> list[str]:
    """Kinds in proportion to their weights, evenly interleaved (smooth weighted round robin)."""
    items = [(k, w) for k, w in weights.items() if w > 0]
    if not items or length <= 0:
        return []
    total = sum(w for _, w in items)
    current = {k: 0.0 for k, _ in items}
    out = []
    for _ in range(length):
        for k, w in items:
            current[k] += w
        best = max(current, key=lambda k: current[k])
        current[best] -= total
        out.append(best)
    return out


def _variant(kind: str, index: int) -> str:
    if kind == "opinion":
        return STANCES[index % len(STANCES)]
    if kind == "induced":
        return INDUCED[index % len(INDUCED)]
    return ""
