"""Big Five targets as "high"/"low" labels: InCharacter dimension accuracy on fixed IPIP administrations."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from conftest import MINIMAL_YAML, write_project
from persllm.config import load_project
from persllm.errors import ConfigError
from persllm.eval import ipip
from persllm.eval.criteria import big_five
from persllm.eval.criteria.big_five import dimension_accuracy, ipip_summary
from persllm.eval.generate import Decoding, ModelUnderTest
from persllm.eval.runner import ModelRun, Plan

# Keyed domain means of the fixed administration: high O, low C, exactly 3 on E, high A, low N.
MEASURED = {"O": 4, "C": 2, "E": 3, "A": 5, "N": 1}
TARGET_YAML = """\
eval:
  target:
    early: {O: high, C: HIGH, E: Low, A: 4.5, N: 3}
"""


def administration(means: dict[str, int]) -> dict[str, Any]:
    """A generated-digit administration whose every item scores the domain's value once keying is applied."""
    answers = {item.id: means[item.domain] if item.keyed == "plus" else 6 - means[item.domain]
               for item in ipip.items("en")}
    return {"method": "generated", "answers": answers, "missing": 0, "raw": {}}


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval, written out here independently of persllm's metrics."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_fixed_administration_scores_as_intended() -> None:
    scored = ipip_summary(administration(MEASURED), None, "en")
    assert scored["domain_mean"] == {d: float(v) for d, v in MEASURED.items()}


def test_dimension_accuracy_labels_numbers_mismatch_and_midpoint() -> None:
    measured = ipip_summary(administration(MEASURED), None, "en")["domain_mean"]
    acc = dimension_accuracy(measured, {"O": "high", "C": "high", "E": "low", "A": 4.5, "N": 3.0})
    # O high = high (hit); C measured low vs high (mismatch); E measured exactly 3 (a miss); A 4.5 counts as high
    # (hit); N's numeric 3 names no side and is not counted.
    assert acc["n"] == 4 and acc["hits"] == 2 and acc["mean"] == 0.5
    low, high = wilson(2, 4)
    assert acc["low"] == pytest.approx(low, abs=1e-3) and acc["high"] == pytest.approx(high, abs=1e-3)
    assert {d: v["match"] for d, v in acc["domains"].items()} == {"O": True, "C": False, "E": False, "A": True}
    assert "N" not in acc["domains"]
    numeric = dimension_accuracy(measured, {"O": 1.5, "C": 2.5, "A": 3.5})  # numbers count by their side of 3
    assert (numeric["hits"], numeric["n"]) == (2, 3)
    unmeasured = dimension_accuracy({**measured, "O": None}, {"O": "high", "A": "low"})
    assert (unmeasured["hits"], unmeasured["n"], unmeasured["unmeasured"]) == (0, 1, 1)
    assert dimension_accuracy(measured, None)["n"] == 0 and dimension_accuracy(measured, None)["mean"] is None


@pytest.fixture
def ipip_section(tmp_path: Path) -> dict[str, Any]:
    project = load_project(write_project(tmp_path / "person", MINIMAL_YAML + TARGET_YAML))
    assert project.eval.target["early"] == {"O": "high", "C": "high", "E": "low", "A": 4.5, "N": 3.0}
    runs = {"base": ModelRun(ModelUnderTest("base", "base", "base", local=False),
                             ipip={"test-person/early": administration(MEASURED)})}
    plan = Plan(probes=[], heldout=[], words=[], ipip_stages=["early"], interview=[], decoding=Decoding(8, 0.7, 1))
    return big_five.result(project, runs, plan, {}, []).to_json()


def test_report_puts_accuracy_next_to_target_distance(ipip_section: dict[str, Any]) -> None:
    target = ipip_section["targets"]["early"]
    assert target["profile"] == {"A": 4.5, "N": 3.0} and target["labels"] == {"O": "high", "C": "high", "E": "low"}
    entry = ipip_section["models"]["base"]
    assert entry["target_distance"]["early"] == pytest.approx(math.sqrt(0.5**2 + 2**2), abs=1e-3)  # numeric only
    acc = entry["dimension_accuracy"]["early"]
    assert (acc["hits"], acc["n"], acc["mean"]) == (2, 4, 0.5)


class Table(HTMLParser):
    """The cells of every row of the first table."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell = False
        self.tables = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables += 1
        if self.tables == 1 and tag == "tr":
            self.rows.append([])
        if self.tables == 1 and tag in ("td", "th"):
            self.cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self.cell = False

    def handle_data(self, data: str) -> None:
        if self.cell and self.tables == 1:
            self.rows[-1][-1] += data


def test_big_five_table_and_summary_show_accuracy(ipip_section: dict[str, Any]) -> None:
    html = big_five.html({"ipip": ipip_section}, ["base"], {"base": "#123456", "target": "#000000"})
    parser = Table()
    parser.feed(html.split("<h3>")[0])  # the per-model table comes before the target and distance tables
    header, row = parser.rows
    cells = dict(zip(header, row))
    low, high = wilson(2, 4)
    assert cells["dimension accuracy"] == f"2/4 (0.50 [{low:.2f}, {high:.2f}] n=4)"
    assert cells["distance to target"] == f"{math.sqrt(4.25):.2f}"
    targets = html.split("<h3>Target profiles</h3>")[1]
    assert "<td>high</td>" in targets and "<td>low</td>" in targets
    line = big_five.summary_line({"ipip": ipip_section}, "base")
    assert "dimension accuracy 2/4" in line and "target d=2.06" in line


@pytest.mark.parametrize("value, message", [("medium", "'medium' is neither a number 1-5 nor a label"),
                                            (6, "6.0 is outside the 1-5 scale"), ("", "neither a number")])
def test_config_rejects_other_labels_and_values(tmp_path: Path, value: object, message: str) -> None:
    yaml = MINIMAL_YAML + f"eval:\n  target:\n    early: {{O: {value!r}}}\n"
    with pytest.raises(ConfigError, match=message):
        load_project(write_project(tmp_path / "person", yaml))
