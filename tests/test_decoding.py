"""Anti-repetition decoding: one meaning in the one-pass eval generator, transformers' generate, llama.cpp, serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from persllm.backends.base import GenParams, with_repetition
from persllm.decoding import Repetition, banned_tokens, for_size, llamacpp_processor, penalize, resolve

REQUESTS = ["<bos>system\nYou are Ada. Who", "<bos>system\nYou are Ada. Tell me about the engine and poetry"]
STRONG = Repetition(repetition_penalty=1.8, no_repeat_ngram=2)


def test_banned_tokens_complete_an_earlier_ngram() -> None:
    assert banned_tokens([5, 6, 7, 5], 2) == {6}  # "5 6" was seen; after a final 5, 6 would repeat it
    assert banned_tokens([5, 6, 7, 5, 6], 3) == {7}
    assert banned_tokens([1, 2, 3], 2) == set()
    assert banned_tokens([4, 4], 1) == {4} and banned_tokens([4], 0) == set()


def test_penalty_divides_positive_and_multiplies_negative_logits_of_answer_tokens() -> None:
    import torch

    scores = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    penalize(scores, [[0, 1]], Repetition(repetition_penalty=2.0))
    assert scores.tolist() == [[1.0, -4.0, 1.0, 3.0]]
    untouched = torch.tensor([[2.0, -2.0]])
    assert penalize(untouched, [[]], STRONG).tolist() == [[2.0, -2.0]]  # nothing generated yet: no change


def test_defaults_by_size_and_project_overrides() -> None:
    assert for_size(270_000_000).active and not for_size(7_000_000_000).active and not for_size(None).active
    assert resolve(None, None, 270_000_000) == for_size(270_000_000)
    assert resolve(1.0, 0, 270_000_000) == Repetition()  # a project can turn it off
    assert resolve(1.3, None, None) == Repetition(repetition_penalty=1.3)
    with pytest.raises(ValueError):
        Repetition(repetition_penalty=0.9)


def test_cache_keys_of_plain_requests_are_unchanged() -> None:
    from persllm.backends.cache import request_key

    class Plain:
        repetition = Repetition()

    class Small:
        repetition = for_size(270_000_000)

    params = GenParams(temperature=0.0, max_tokens=8)
    assert with_repetition(Plain(), params) == params  # so keys written before these fields existed still match
    assert request_key("m", "hi", with_repetition(Small(), params)) != request_key("m", "hi", params)


@pytest.fixture(scope="module")
def backend(tiny_model: Path):  # type: ignore[no-untyped-def]
    from persllm.backends.hf import HFBackend

    return HFBackend(tiny_model)


def test_one_pass_rows_and_generate_apply_the_same_repetition(backend) -> None:  # type: ignore[no-untyped-def]
    backend.repetition = STRONG
    try:
        rows = backend.generate_rows(REQUESTS, [0.0, 0.0], 16)
        reference = [backend.complete(r, GenParams(temperature=0.0, max_tokens=16)) for r in REQUESTS]
        plain = backend.generate_rows(REQUESTS, [0.0, 0.0], 16, repetition=Repetition())
    finally:
        backend.repetition = Repetition()
    assert [r.text for r in rows] == [r.text for r in reference]
    assert [r.text for r in rows] != [r.text for r in plain]  # the random tiny model repeats itself without it


def test_a_request_can_override_the_backend_default(backend) -> None:  # type: ignore[no-untyped-def]
    backend.repetition = STRONG
    try:
        off = backend.complete(REQUESTS[0], GenParams(temperature=0.0, max_tokens=16, repetition_penalty=1.0,
                                                      no_repeat_ngram=0))
    finally:
        backend.repetition = Repetition()
    plain = backend.complete(REQUESTS[0], GenParams(temperature=0.0, max_tokens=16))
    assert off.text == plain.text


def test_llamacpp_processor_matches_penalize() -> None:
    import numpy as np
    import torch

    process = llamacpp_processor(STRONG)
    prompt = np.array([9, 8, 7])
    logits = np.linspace(-3, 3, 12).astype(np.float32)
    assert np.array_equal(process(prompt, logits), logits)  # the first call sees the prompt alone
    answer = [3, 4, 3]
    got = process(np.concatenate([prompt, answer]), logits)
    expected = penalize(torch.from_numpy(logits.copy())[None, :], [answer], STRONG)[0].numpy()
    assert np.array_equal(got, expected) and got[4] == -np.inf  # "3 4" seen, so 4 after the final 3 is banned
    assert got[7] == logits[7]  # prompt tokens are never penalised


def test_project_decoding_settings_are_validated(tmp_path: Path) -> None:
    from conftest import write_project
    from persllm.config import load_project
    from persllm.errors import ConfigError

    root = write_project(tmp_path / "p")
    assert load_project(root).decoding.repetition_penalty is None
    assert load_project(root, ["decoding.repetition_penalty=1.2"]).decoding.repetition_penalty == 1.2
    with pytest.raises(ConfigError, match="repetition_penalty"):
        load_project(root, ["decoding.repetition_penalty=0.5"])


def test_serve_passes_a_requests_repetition_settings_to_the_backend() -> None:
    from persllm.serve.parse import Limits, _params

    limits = Limits()
    plain = _params({"messages": []}, limits)
    assert plain.repetition_penalty is None and plain.no_repeat_ngram is None  # the model's own default applies
    asked = _params({"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}, limits)
    assert asked.repetition_penalty == 1.3 and asked.no_repeat_ngram == 3

