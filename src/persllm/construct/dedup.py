"""Near-duplicate removal with MinHash + LSH banding (vectorised; no quadratic loop over pairs)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from persllm.construct.plan import Slot
from persllm.construct.records import Question
from persllm.similarity import hashed_shingles, normalize

_PRIME = np.uint64((1 << 61) - 1)
_MAX = np.uint64((1 << 32) - 1)


def signatures(texts: Sequence[str], num_perm: int = 64, seed: int = 1) -> np.ndarray:
    """MinHash signatures, one row per text (uint64, num_perm columns)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_PRIME) - 1, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_PRIME) - 1, size=num_perm, dtype=np.uint64)
    out = np.empty((len(texts), num_perm), dtype=np.uint64)
    for row, text in enumerate(texts):
        h = np.fromiter(hashed_shingles(text), dtype=np.uint64)
        # (a*h + b) mod p for all permutations at once; uint64 wraps, which keeps the hash family universal enough.
        out[row] = ((np.outer(h, a) + b) % _PRIME & _MAX).min(axis=0)
    return out


def near_duplicates(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 64,
                    bands: int = 16) -> tuple[list[int], dict[int, int]]:
    """Indices to keep (first of each cluster, in input order) and a map dropped index -> kept index.

    Candidate pairs come from LSH buckets, are confirmed by estimated Jaccard >= threshold, and are merged with
    union-find so a chain of near-duplicates collapses into one cluster.
    """
    n = len(texts)
    if n == 0:
        return [], {}
    sig = signatures(texts, num_perm)
    rows = num_perm // bands
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for band in range(bands):
        block = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            buckets[key.tobytes()].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            head = members[0]
            sims = (sig[members[1:]] == sig[head]).mean(axis=1)
            for other, sim in zip(members[1:], sims):
                if sim >= threshold:
                    ra, rb = find(head), find(other)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)  # the earliest item represents its cluster
    keep, dropped = [], {}
    for i in range(n):
        root = find(i)
        if root == i:
            keep.append(i)
        else:
            dropped[i] = root
    return keep, dropped


def distinct_questions(asked: Sequence[tuple[Slot, Question]], threshold: float) -> tuple[list[int], dict[int, int]]:
    """Indices of the questions to keep and a map dropped -> kept, stage by stage.

    A model-written question is dropped when it is a near-duplicate (MinHash) of an earlier one of its stage; a
    rule-built one only when its text is identical, since "What happened to you in 1835?" and "... in 1843?" share
    most shingles but ask different things. The same question at another stage stays: its answer differs by stage.
    """
    dropped: dict[int, int] = {}
    by_stage: dict[str, list[int]] = {}
    for i, (slot, _) in enumerate(asked):
        by_stage.setdefault(slot.stage, []).append(i)
    for members in by_stage.values():
        _, near = near_duplicates([asked[i][1].text for i in members], threshold)
        first: dict[str, int] = {}
        for position, i in enumerate(members):
            question = asked[i][1]
            same = first.setdefault(normalize(question.text), i)
            if same != i:
                dropped[i] = same
            elif question.origin != "template" and position in near:
                dropped[i] = members[near[position]]
    keep = [i for i in range(len(asked)) if i not in dropped]
    return keep, dropped
