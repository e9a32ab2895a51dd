"""Automated DPO pairs: the persona's golden answer beats other stages, other personas, generic and induced answers."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from persllm import text
from persllm.config import Project
from persllm.similarity import char_jaccard, normalize, tfidf_most_similar
from persllm.train.data import answer_text, sample_prompt
from persllm.types import NEGATIVE_TYPES, Negative, PreferencePair, Sample, stable_id

PEER_MIN_SIMILARITY = 0.2
"""Cosine TF-IDF similarity a peer question needs before its answer is used as an other-persona negative."""


def build_pairs(project: Project, samples: Sequence[Sample], negatives: Sequence[Negative],
                peer_samples: Sequence[Sample] = ()) -> tuple[list[PreferencePair], dict[str, Any]]:
    """DPO pairs for train and test samples (split them with `pairs_by_split`), with counts and drop reasons."""
    dpo = project.dpo
    by_id = {s.id: s for s in samples}
    dropped: Counter[str] = Counter()
    candidates: dict[str, list[Negative]] = defaultdict(list)
    for neg in negatives:
        if neg.sample_id not in by_id:
            dropped["unknown_sample"] += 1
        elif neg.type not in dpo.negative_types:
            dropped["type_not_enabled"] += 1
        else:
            candidates[neg.sample_id].append(neg)
    if "other_persona" in dpo.negative_types and peer_samples:
        peer_negs, no_match = other_persona_negatives(samples, peer_samples)
        dropped["no_peer_match"] += no_match
        for neg in peer_negs:
            candidates[neg.sample_id].append(neg)

    pairs: list[PreferencePair] = []
    for sample in samples:
        if sample.id not in candidates:
            continue
        if not sample.response.strip():
            dropped["empty"] += len(candidates[sample.id])
            continue
        kept = _pairs_for_sample(project, sample, candidates[sample.id], dropped)
        pairs.extend(kept)
    return pairs, _stats(pairs, by_id, dropped)


def pairs_by_split(pairs: Iterable[PreferencePair], samples: Iterable[Sample]) -> dict[str, list[PreferencePair]]:
    """Pairs grouped by their sample's split ("train", "test"), so held-out pairs are never trained on."""
    split = {s.id: s.split for s in samples}
    groups: dict[str, list[PreferencePair]] = defaultdict(list)
    for pair in pairs:
        groups[split.get(pair.sample_id, "")].append(pair)
    return dict(groups)


def _pairs_for_sample(project: Project, sample: Sample, negs: Sequence[Negative],
                      dropped: Counter[str]) -> list[PreferencePair]:
    """Valid pairs of one sample: no empty or near-identical rejected answers, at most pairs_per_sample of them."""
    dpo = project.dpo
    prompt = tuple(sample_prompt(project, sample))
    chosen = answer_text(project, sample.analysis, sample.response)
    seen: set[str] = set()
    valid: list[tuple[Negative, float]] = []
    for neg in negs:
        key = normalize(neg.response, case="lower", punctuation="space")
        if not key:
            dropped["empty"] += 1
            continue
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        # Responses only: a rejected answer may reuse the chosen analysis, which would inflate the similarity.
        similarity = char_jaccard(sample.response, neg.response)
        if similarity >= dpo.max_similarity:
            dropped["near_identical"] += 1
            continue
        valid.append((neg, similarity))
    # The cap budgets training time; held-out pairs only measure preferences, so every contrast is kept for them.
    limit = max(0, dpo.pairs_per_sample) if sample.split != "test" else len(valid)
    picked = _round_robin(valid, _type_order(sample, dpo.negative_types), limit)
    dropped["over_limit"] += len(valid) - len(picked)
    pairs = []
    for neg, similarity in picked:
        rejected = answer_text(project, neg.analysis or sample.analysis, neg.response)
        pairs.append(PreferencePair(id=stable_id("pair", sample.id, neg.type, rejected), sample_id=sample.id,
                                    negative_type=neg.type, prompt=prompt, chosen=chosen, rejected=rejected,
                                    similarity=round(similarity, 4)))
    return pairs


def _type_order(sample: Sample, types: Sequence[str]) -> list[str]:
    """Negative types in the order a sample takes them: an induced sample's premise-accepting answer first (the
    anti-induction signal), otherwise a rotation by sample id, so a small per-sample cap still covers every type."""
    order = list(types)
    if sample.kind == "induced" and "induced" in order:
        order.remove("induced")
        return ["induced", *order]
    shift = int(stable_id(sample.id, length=8), 16) % max(1, len(order))
    return order[shift:] + order[:shift]


def _round_robin(valid: Sequence[tuple[Negative, float]], types: Sequence[str],
                 limit: int) -> list[tuple[Negative, float]]:
    """One negative of each type in turn (config order), least similar first, so pairs cover all contrasts."""
    order = {t: i for i, t in enumerate(types)}
    queues = defaultdict(list)
    for neg, sim in sorted(valid, key=lambda item: (item[1], item[0].id)):
        queues[neg.type].append((neg, sim))
    ordered = sorted(queues, key=lambda t: order.get(t, len(order)))
    picked: list[tuple[Negative, float]] = []
    while len(picked) < limit and any(queues[t] for t in ordered):
        for t in ordered:
            if queues[t] and len(picked) < limit:
                picked.append(queues[t].pop(0))
    return picked


def _stats(pairs: Sequence[PreferencePair], by_id: dict[str, Sample], dropped: Counter[str]) -> dict[str, Any]:
    split_of = {p.id: by_id[p.sample_id].split or "unsplit" for p in pairs}
    by_type = Counter(p.negative_type for p in pairs)
    by_split = Counter(split_of.values())
    by_split_type: dict[str, dict[str, int]] = defaultdict(dict)
    for (split, kind), n in sorted(Counter((split_of[p.id], p.negative_type) for p in pairs).items()):
        by_split_type[split][kind] = n
    return {"pairs": len(pairs), "samples_with_pairs": len({p.sample_id for p in pairs}),
            "by_type": {t: by_type.get(t, 0) for t in NEGATIVE_TYPES if by_type.get(t)},
            "by_split": dict(sorted(by_split.items())), "by_split_type": dict(by_split_type),
            "dropped": {k: v for k, v in sorted(dropped.items()) if v}}


# -- other-persona negatives ------------------------------------------------------------------------------------
def other_persona_negatives(samples: Sequence[Sample],
                            peers: Sequence[Sample]) -> tuple[list[Negative], int]:
    """For each sample, the answer another persona gave to the most similar question (TF-IDF cosine) as a negative."""
    own = {s.persona for s in samples}
    peers = [p for p in peers if p.persona not in own and p.response.strip()]
    if not samples or not peers:
        return [], len(samples)
    best, score = tfidf_most_similar(
        [text.content_words(s.question) for s in samples], [text.content_words(p.question) for p in peers])
    negatives, misses = [], 0
    for sample, index, sim in zip(samples, best, score, strict=True):
        if index < 0 or sim < PEER_MIN_SIMILARITY:
            misses += 1
            continue
        peer = peers[index]
        negatives.append(Negative(id=stable_id("other_persona", sample.id, peer.id), sample_id=sample.id,
                                  type="other_persona", response=peer.response, analysis=peer.analysis,
                                  meta={"peer_sample": peer.id, "peer_persona": peer.persona,
                                        "question_similarity": round(float(sim), 4)}))
    return negatives, misses

