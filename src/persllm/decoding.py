"""Decoding settings that keep a small model out of loops, defined once and applied by every local backend.

A 270M model tuned for minutes falls into loops ("I have a good reputation, and I have a good reputation, and ...")
under greedy decoding. Two standard remedies, with one meaning everywhere (eval, chat, serve, the training smoke
tests, the transformers and llama.cpp backends alike): a repetition penalty (CTRL, Keskar et al. 2019: a positive
logit is divided by it, a negative one multiplied) on every token already generated in this answer, and a ban on any
token that would repeat an n-gram of this answer. Only the answer's own tokens count: a persona must be free to
reuse the words of the question and of its system prompt (transformers' built-in processor also counts the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

SMALL_MODEL_PARAMETERS = 1_500_000_000  # at or below this size the small-model defaults apply


@dataclass(frozen=True)
class Repetition:
    """Anti-repetition settings of one model's answers (the defaults change nothing)."""

    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0

    def __post_init__(self) -> None:
        if self.repetition_penalty < 1.0 or self.no_repeat_ngram < 0:
            raise ValueError("repetition_penalty must be at least 1.0 and no_repeat_ngram at least 0 (0 = off)")

    @property
    def active(self) -> bool:
        """Whether any logit is ever changed."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram > 0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for reports and stats."""
        return asdict(self)


# Chosen by `python -m benchmarks recipe` (benchmarks/README.md): on Ada Lovelace's tuned 270M demo model (30 SFT
# steps) the DPO model passed 5 of 30 probes with it, 5 with the penalty alone and 2 with plain greedy decoding, and
# the 4-gram ban stops the loops the penalty alone lets through. Larger models keep their own (and servers') defaults.
SMALL_MODEL_REPETITION = Repetition(repetition_penalty=1.1, no_repeat_ngram=4)


def for_size(parameters: int | None) -> Repetition:
    """The default decoding for a model of this many parameters (unknown size: no change)."""
    if parameters is not None and 0 < parameters <= SMALL_MODEL_PARAMETERS:
        return SMALL_MODEL_REPETITION
    return Repetition()


def resolve(repetition_penalty: float | None, no_repeat_ngram: int | None, parameters: int | None) -> Repetition:
    """A project's settings (None = the default for the model's size) made concrete."""
    auto = for_size(parameters)
    return Repetition(repetition_penalty=auto.repetition_penalty if repetition_penalty is None else repetition_penalty,
                    no_repeat_ngram=auto.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram)


def override(default: Repetition, repetition_penalty: float | None, no_repeat_ngram: int | None) -> Repetition:
    """`default` with a request's explicit values (None keeps the default's)."""
    return Repetition(
        repetition_penalty=default.repetition_penalty if repetition_penalty is None else repetition_penalty,
        no_repeat_ngram=default.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram)


def banned_tokens(generated: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in `generated` (its last n-1 tokens seen before)."""
    if n <= 0 or len(generated) < n:
        return set()
    if n == 1:
        return set(generated)
    tail = tuple(generated[-(n - 1):])
    return {generated[i + n - 1] for i in range(len(generated) - n + 1) if tuple(generated[i:i + n - 1]) == tail}


def penalize(scores: Any, generated: Sequence[Sequence[int]], repetition: Repetition) -> Any:
    """Apply `repetition` in place to next-token scores [rows, vocab] (a torch tensor), one answer so far per row."""
    import torch

    if not repetition.active:
        return scores
    for row, tokens in enumerate(generated):
        if not tokens:
            continue
        if repetition.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(tokens)), dtype=torch.long, device=scores.device)
            values = scores[row, seen]
            scores[row, seen] = torch.where(values > 0, values / repetition.repetition_penalty,
                                            values * repetition.repetition_penalty)
        banned = banned_tokens(tokens, repetition.no_repeat_ngram)
        if banned:
            scores[row, torch.tensor(sorted(banned), dtype=torch.long, device=scores.device)] = float("-inf")
    return scores


def hf_processor(repetition: Repetition, prompt_width: int) -> Any:
    """A transformers LogitsProcessor applying `repetition` to the tokens after the (padded) prompt's `prompt_width`."""
    from transformers import LogitsProcessor

    class AnswerRepetition(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            return penalize(scores, input_ids[:, prompt_width:].tolist(), repetition)

    return AnswerRepetition()


def llamacpp_processor(repetition: Repetition) -> Any:
    """A llama-cpp-python logits processor applying `repetition`: the first call's input is the prompt."""
    import numpy as np
    import torch

    prompt: list[int] = []

    def process(input_ids: Any, scores: Any) -> Any:
        if not prompt:
            prompt.append(len(input_ids))
        generated = [int(t) for t in input_ids[prompt[0]:]]
        if not generated:
            return scores
        row = torch.from_numpy(np.array(scores, dtype=np.float32, copy=True))[None, :]
        return penalize(row, [generated], repetition)[0].numpy()

    return process
