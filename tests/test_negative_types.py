"""The one list of DPO negative types drives the config defaults, its validation and each method's builders."""

from __future__ import annotations

from pathlib import Path

import pytest

from persllm.config import ConstructConfig, DPOConfig, load_project
from persllm.construct.full import FullMethod
from persllm.construct.grounded import GroundedMethod
from persllm.errors import ConfigError
from persllm.types import CONSTRUCTED_NEGATIVES, NEGATIVE_TYPES, NEGATIVES


def test_defaults_come_from_the_table() -> None:
    assert ConstructConfig().negatives == [t.name for t in NEGATIVES if t.built_by == "construct"]
    assert DPOConfig().negative_types == list(NEGATIVE_TYPES)
    assert NEGATIVE_TYPES == ("other_stage", "other_persona", "non_personified", "induced")


def test_every_constructed_type_has_a_builder_in_each_method() -> None:
    assert set(FullMethod.NEGATIVE_REQUESTS) == set(CONSTRUCTED_NEGATIVES)
    assert set(GroundedMethod.NEGATIVE_BUILDERS) == set(CONSTRUCTED_NEGATIVES)


def test_validation_reads_the_table(project_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_project(project_dir, overrides=["dpo.negative_types=[other_stage,inducd]"])
    assert "dpo.negative_types: unknown negative type 'inducd' (did you mean 'induced'?)" in str(err.value)
