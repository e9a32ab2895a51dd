"""Text-overlap metrics and intervals: sentence BLEU, ROUGE-L, perplexity, t and Wilson confidence intervals.

BLEU and ROUGE-L work on persllm's language-aware tokens (a CJK character, a word, or a punctuation mark), so Chinese
needs no word segmentation. BLEU equals sacrebleu's sentence_bleu (exp smoothing, effective order) on those tokens.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from persllm import text as T

# Two-sided 95% Student t critical values for 1..30 degrees of freedom; beyond 30 the normal 1.96 is close enough.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% confidence interval and the number of values behind it."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self, digits: int = 3) -> dict[str, float | int | None]:
        """Rounded plain dict for report.json."""
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, digits)
        return {"mean": r(self.mean), "low": r(self.low), "high": r(self.high), "n": self.n}


def tokens(text: str) -> list[str]:
    """Lowercased tokens used by BLEU and ROUGE-L (CJK characters count one each)."""
    return [t.lower() for t in T.tokens(text)]


def sentence_bleu(hypothesis: str, reference: str, max_n: int = 4) -> float:
    """BLEU (0-100) of one hypothesis against one reference, with exponential smoothing of empty n-gram orders."""
    hyp, ref = tokens(hypothesis), tokens(reference)
    if not hyp or not ref:
        return 0.0
    if not set(hyp) & set(ref):
        return 0.0  # no matching unigram means no match of any order: sacrebleu returns 0 without smoothing
    precisions: list[float] = []
    smooth = 1.0
    for n in range(1, max_n + 1):
        hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        total = sum(hyp_grams.values())
        if total == 0:  # effective order: orders longer than the hypothesis are left out, as sacrebleu does
            break
        matches = sum(min(c, ref_grams[g]) for g, c in hyp_grams.items())
        if matches == 0:
            smooth *= 2  # sacrebleu "exp" smoothing: 1/2, 1/4, ... for successive empty orders
            precisions.append(100.0 / (smooth * total))
        else:
            precisions.append(100.0 * matches / total)
    log_mean = sum(math.log(p) for p in precisions) / len(precisions)
    brevity = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_mean)


def symmetric_bleu(a: str, b: str) -> float:
    """BLEU averaged over both directions, so neither of two samples is privileged as the reference."""
    return (sentence_bleu(a, b) + sentence_bleu(b, a)) / 2


def rouge_l(hypothesis: str, reference: str, beta: float = 1.2) -> float:
    """ROUGE-L F-measure (0-1) from the longest common token subsequence (beta 1.2 as in RoleBench)."""
    hyp, ref = tokens(hypothesis), tokens(reference)
    if not hyp or not ref:
        return 0.0
    lcs = _lcs(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def perplexity(logprob_sum: float, n_tokens: int) -> float | None:
    """Per-token perplexity from a summed log-likelihood (None without tokens)."""
    return math.exp(-logprob_sum / n_tokens) if n_tokens > 0 else None


def mean_ci(values: Sequence[float], bounds: tuple[float, float] | None = None) -> Estimate:
    """Mean with a 95% Student t interval (none for fewer than two values), clipped to the scale's `bounds`."""
    n = len(values)
    if n == 0:
        return Estimate(None, None, None, 0)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, None, None, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:  # a BLEU interval below 0 or a judge score above 5 says nothing a reader can use
        low, high = max(bounds[0], low), min(bounds[1], high)
    return Estimate(mean, low, high, n)


def rate_ci(successes: int, n: int, z: float = 1.96) -> Estimate:
    """A proportion with its 95% Wilson score interval (sensible for small n and rates near 0 or 1)."""
    if n == 0:
        return Estimate(None, None, None, 0)
    p = successes / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


@dataclass(frozen=True)
class Paired:
    """Two models on the same items: B's pass rate minus A's with a 95% interval, and McNemar's exact p."""

    n: int
    a_rate: float | None
    b_rate: float | None
    difference: Estimate  # b - a
    only_a: int  # items A passed and B failed
    only_b: int
    p_value: float | None  # two-sided exact McNemar test on the discordant items

    def as_dict(self, digits: int = 3) -> dict[str, object]:
        """Rounded plain dict for report.json."""
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, digits)
        return {"n": self.n, "a_rate": r(self.a_rate), "b_rate": r(self.b_rate),
                "difference": self.difference.as_dict(digits), "only_a": self.only_a, "only_b": self.only_b,
                "p_value": r(self.p_value) if self.p_value is None or self.p_value >= 10 ** -digits
                else float(f"{self.p_value:.2g}")}


def paired(a: Sequence[bool], b: Sequence[bool], z: float = 1.96) -> Paired:
    """Compare two models' pass/fail on the same items (paired, so shared easy and hard items cancel out).

    The interval is Newcombe's hybrid score interval for a difference of paired proportions (his method 10),
    which keeps its coverage for small n and rates near 0 or 1, where the Wald interval does not.
    """
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same items: {len(a)} != {len(b)}")
    n = len(a)
    if n == 0:
        return Paired(0, None, None, Estimate(None, None, None, 0), 0, 0, None)
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    w1, w2 = rate_ci(both + only_a, n, z), rate_ci(both + only_b, n, z)
    l1, u1, l2, u2 = w1.low or 0.0, w1.high or 0.0, w2.low or 0.0, w2.high or 0.0
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    d = p2 - p1
    delta = math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    epsilon = math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    interval = Estimate(d, max(-1.0, d - delta), min(1.0, d + epsilon), n)
    return Paired(n, p1, p2, interval, only_a, only_b, mcnemar_exact(only_a, only_b))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p: the discordant items split as a fair coin would (1.0 without any)."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)
