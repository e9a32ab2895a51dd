"""Anti-induction and temporal boundary: corrected false premises and TimeChara's temporal types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from persllm.eval.criteria.base import Criterion, Inputs
from persllm.eval.render import bars_html, pct, table_html


def anti_induction(scores: dict[str, Any]) -> dict[str, Any]:
    """The boundary rates, read off the probe results of one model (TimeChara's temporal types included)."""
    by_kind = scores["by_kind"]
    return {"corrected_false_premises": by_kind.get("induction"),
            "cannot_know_after_stage": by_kind.get("future") or by_kind.get("temporal"),
            "not_there_long_before": by_kind.get("past_absence"),
            "recalls_own_past": by_kind.get("past_presence"),
            "earlier_stage_kept": by_kind.get("past_only"),
            "identity_break": scores["rejected_by_kind"].get("identity")}


@dataclass(frozen=True)
class AntiInductionResult:
    """Per model: the boundary rates read off its probe results."""

    models: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """report.json's "anti_induction" section."""
        return {"models": self.models}


def score(inputs: Inputs) -> AntiInductionResult:
    """Every model's boundary rates."""
    return AntiInductionResult({m: anti_induction(inputs.probe_scores[m]) for m in inputs.names})


def summary(report: dict[str, Any], model: str) -> list[list[str]]:
    """The terminal row: every boundary rate."""
    a = report["anti_induction"]["models"][model]
    return [[model, "anti-induction", (f"corrected {pct(a['corrected_false_premises'])} · cannot-know "
             f"{pct(a['cannot_know_after_stage'])} · not there {pct(a.get('not_there_long_before'))} · "
             f"own past {pct(a.get('recalls_own_past'))} · earlier stage kept "
             f"{pct(a.get('earlier_stage_kept'))} · identity breaks {pct(a['identity_break'])}")]]


def html(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    """The boundary section: each measured rate per model, as a table and bars."""
    a = r["anti_induction"]["models"]
    keys = [("corrected_false_premises", "false premises corrected (higher)", "corrected"),
            ("cannot_know_after_stage", "future: 'cannot know' after the stage (higher)", "future"),
            ("not_there_long_before", "past-absence: not there, long before (higher)", "past-absence"),
            ("recalls_own_past", "past-presence: recalls own past (higher)", "past-presence"),
            ("earlier_stage_kept", "past-only: earlier stage kept (higher)", "past-only"),
            ("identity_break", "identity breaks (lower)", "identity breaks")]
    keys = [k for k in keys if any(a[m].get(k[0]) for m in models)] or keys[:1]
    rows = [[m] + [a[m].get(k) for k, _, _ in keys] for m in models]
    table = {m: [a[m].get(k) for k, _, _ in keys] for m in models}
    return "".join((("<p class='note'>Temporal types after TimeChara (Ahn et al., 2024): future, "
                    "past-absence, past-presence and past-only; see docs/probes.md.</p>"),
                    table_html(["model"] + [label for _, label, _ in keys], rows),
                    bars_html("Boundary rates", [short for _, _, short in keys], table, palette, 1.0)))


CRITERION = Criterion("anti_induction", "anti-induction", "Anti-induction and temporal boundary", score, summary, html)
