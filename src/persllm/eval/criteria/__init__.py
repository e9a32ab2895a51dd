"""The evaluation criteria, one module each, in the one ordered table that report.json, report.html and the
terminal summary follow. Each module owns its scoring, its typed result record, its judge tasks (if judged) and its
report and summary rendering; adding a criterion is one module and one line here (docs/adding-an-eval-criterion.md).
"""

from __future__ import annotations

from persllm.eval.criteria import (
    answer_format,
    anti_induction,
    big_five,
    distinction,
    interview,
    precision,
    probes,
    ranking,
)
from persllm.eval.criteria.base import Criterion

CRITERIA: tuple[Criterion, ...] = (
    distinction.CRITERION,
    probes.CRITERION,
    answer_format.CRITERION,
    anti_induction.CRITERION,
    big_five.CRITERION,
    precision.CRITERION,
    ranking.CRITERION,
    interview.CRITERION,
)
"""Every criterion, in the order of the report's sections."""

__all__ = ["CRITERIA", "Criterion"]
