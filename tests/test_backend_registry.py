"""BACKENDS: one table read by config, variants and open_backend; capabilities are attributes of each backend."""

from __future__ import annotations

import importlib

import pytest

from persllm.backends import BACKENDS, open_backend
from persllm.backends.cache import CachedBackend
from persllm.backends.fake import FakeBackend
from persllm.config import ModelSpec, parse_model_spec


def test_every_row_names_an_opener_that_exists() -> None:
    for kind in BACKENDS.values():
        module, _, function = kind.opener.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), kind.name


def test_unknown_backends_get_the_forms_and_the_closest_name() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'opnai' \(did you mean 'openai'\?\); use default, "
                                         r"openai:MODEL\[@URL\], llamacpp:PATH, hf:MODEL or fake"):
        parse_model_spec("opnai:gpt-4o-mini")
    with pytest.raises(ValueError, match="did you mean 'hf'"):
        ModelSpec(backend="hff", model="m")


def test_capabilities_are_attributes_and_a_cache_passes_them_on(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = open_backend(ModelSpec(backend="fake"))
    assert isinstance(fake, FakeBackend)
    assert (fake.concurrency, fake.in_process, fake.streaming, fake.scoring) == (1, False, False, False)
    cached = CachedBackend(fake, tmp_path / "cache.sqlite")
    assert cached.concurrency == 1 and not cached.in_process
    cached.close()
