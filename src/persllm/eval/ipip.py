"""IPIP-NEO-120 (Johnson 2014, public domain) administered in character, and its standard scoring.

Answers are on the 1-5 scale (Very Inaccurate .. Very Accurate). A `plus`-keyed item scores the answer as given, a
`minus`-keyed item scores 6 - answer. A domain is the sum of its 24 item scores (24-120), a facet the sum of its 4
(4-20); means (1-5) are reported too, and are what profiles are compared on, because they stay comparable when a
judge leaves some items missing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

DOMAINS = ("O", "C", "E", "A", "N")
DOMAIN_NAMES = {"O": "Openness", "C": "Conscientiousness", "E": "Extraversion", "A": "Agreeableness",
                "N": "Neuroticism"}
FACET_NAMES = {
    "N": ("Anxiety", "Anger", "Depression", "Self-Consciousness", "Immoderation", "Vulnerability"),
    "E": ("Friendliness", "Gregariousness", "Assertiveness", "Activity Level", "Excitement-Seeking", "Cheerfulness"),
    "O": ("Imagination", "Artistic Interests", "Emotionality", "Adventurousness", "Intellect", "Liberalism"),
    "A": ("Trust", "Morality", "Altruism", "Cooperation", "Modesty", "Sympathy"),
    "C": ("Self-Efficacy", "Orderliness", "Dutifulness", "Achievement-Striving", "Self-Discipline", "Cautiousness"),
}
OPTIONS = ("1", "2", "3", "4", "5")
LANG_FILES = {"en": "questions.en.json", "zh": "questions.zh-cn.json"}

# Instructions shared by every item (they form the cached prefix of the one-pass log-likelihood administration).
INSTRUCTIONS = {
    "en": ("Here is a statement about you. How accurately does it describe you as you are now?\n"
           "1 = very inaccurate, 2 = moderately inaccurate, 3 = neither accurate nor inaccurate, "
           "4 = moderately accurate, 5 = very accurate.\nAnswer with one number.\nStatement: \"{statement}\""),
    "zh": ("下面是一句关于你的描述。它在多大程度上符合现在的你？\n"
           "1 = 非常不符合，2 = 比较不符合，3 = 说不清，4 = 比较符合，5 = 非常符合。\n请只用一个数字回答。\n描述：“{statement}”"),
}
INTERVIEW = {
    "en": "Someone who knows you says: \"{statement}\" Is that true of you? Tell me honestly, in your own words.",
    "zh": "认识你的人说你“{statement}”。这符合你吗？请用你自己的话坦白地说说。",
}


@dataclass(frozen=True)
class Item:
    """One inventory item."""

    id: str
    text: str
    keyed: str  # plus | minus
    domain: str  # O, C, E, A, N
    facet: int  # 1-6


@cache
def items(language: str = "en") -> tuple[Item, ...]:
    """The 120 items in the project's language (Chinese uses the zh-cn translation)."""
    name = LANG_FILES.get(language, LANG_FILES["en"])
    raw = json.loads(resources.files("persllm.data").joinpath("ipip", name).read_text(encoding="utf-8"))
    return tuple(Item(r["id"], r["text"], r["keyed"], r["domain"], int(r["facet"])) for r in raw)


def statement(item: Item, language: str) -> str:
    """The item as a first-person sentence ('Worry about things' -> 'I worry about things.')."""
    if language == "zh":
        return item.text
    text = item.text.strip()
    return "I " + (text if text.startswith("I ") else text[:1].lower() + text[1:]) + "."


def item_score(item: Item, answer: int) -> int:
    """Keyed score of one answer: plus items as given, minus items reversed (6 - answer)."""
    if answer not in (1, 2, 3, 4, 5):
        raise ValueError(f"IPIP answers are 1-5, got {answer!r} for item {item.id}")
    return answer if item.keyed == "plus" else 6 - answer


def score(answers: Mapping[str, float], inventory: Sequence[Item]) -> dict[str, Any]:
    """Domain and facet sums and means from answers keyed by item id (missing items are left out of the means)."""
    domains: dict[str, list[float]] = {d: [] for d in DOMAINS}
    facets: dict[str, list[float]] = {f"{d}{f}": [] for d in DOMAINS for f in range(1, 7)}
    for item in inventory:
        if item.id not in answers:
            continue
        value = float(answers[item.id])
        keyed = value if item.keyed == "plus" else 6 - value
        domains[item.domain].append(keyed)
        facets[f"{item.domain}{item.facet}"].append(keyed)
    complete = all(len(v) == 24 for v in domains.values())
    return {
        "answered": sum(len(v) for v in domains.values()),
        "domain_sum": {d: sum(v) for d, v in domains.items()} if complete else None,
        "facet_sum": {f: sum(v) for f, v in facets.items()} if complete else None,
        "domain_mean": {d: (sum(v) / len(v) if v else None) for d, v in domains.items()},
        "facet_mean": {f: (sum(v) / len(v) if v else None) for f, v in facets.items()},
    }


def distance(a: Mapping[str, float | None], b: Mapping[str, float | None]) -> float | None:
    """Euclidean distance between two domain-mean profiles over the domains both have (None if none)."""
    shared = [(x, y) for d in DOMAINS if (x := a.get(d)) is not None and (y := b.get(d)) is not None]
    if not shared:
        return None
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in shared))


def choice_prompts(language: str) -> list[tuple[Item, str]]:
    """Each item with its questionnaire question (the user turn of the choice administration)."""
    lang = language if language in INSTRUCTIONS else "en"
    return [(item, INSTRUCTIONS[lang].format(statement=statement(item, language))) for item in items(language)]


def interview_items(language: str, n: int) -> list[Item]:
    """`n` items spread over the 30 facets (one per facet first, then second items, ...)."""
    ordered = sorted(items(language), key=lambda it: (_rank_in_facet(it, language), it.domain, it.facet))
    return ordered[:n]


def _rank_in_facet(item: Item, language: str) -> int:
    same = [it.id for it in items(language) if it.domain == item.domain and it.facet == item.facet]
    return same.index(item.id)


def interview_question(item: Item, language: str) -> str:
    """An open question about one item, for the interview administration rated by a judge."""
    lang = language if language in INTERVIEW else "en"
    text = statement(item, language)
    if lang == "en":  # "I worry about things." -> "you worry about things"
        text = re.sub(r"^I\b", "You", text.rstrip("."))
        text = re.sub(r"^You am\b", "You are", text)
    return INTERVIEW[lang].format(statement=text)


def choices_from_logprobs(logprobs: Sequence[float]) -> tuple[int, list[float]]:
    """The most likely option (1-5) and the probabilities renormalised over the five options."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    probs = [w / total for w in weights]
    return probs.index(max(probs)) + 1, probs


def calibrated_choices(logprobs: Sequence[Sequence[float]]) -> list[int]:
    """Options (1-5) after contextual calibration: each option's mean log-probability over all items is subtracted.

    Small models put most mass on one label whatever the item (the 270M base model says "1" about 70% of the
    time), which would leave only the keying pattern in the scores; calibrating keeps what each item changes.
    """
    means = [sum(row[k] for row in logprobs) / len(logprobs) for k in range(len(logprobs[0]))]
    return [max(range(len(row)), key=lambda k: row[k] - means[k]) + 1 for row in logprobs]


_DIGIT = re.compile(r"(?<!\d)([1-5])(?!\d)")


def parse_choice(text: str) -> int | None:
    """A generated Likert answer: the one digit 1-5 it gives (None if there is none, or several different ones)."""
    found = set(_DIGIT.findall(text))
    return int(found.pop()) if len(found) == 1 else None
