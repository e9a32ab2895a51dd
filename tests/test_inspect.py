"""`persllm inspect`: the data audit page and terminal summary over a finished construct stage."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import chromium_page, needs_chromium, write_project
from persllm.cli import main
from persllm.config import load_project
from persllm.construct.audit_page import format_figure, meta_extras, pick_samples, render_audit_page
from persllm.pipeline import run
from persllm.workspace import Workspace

AUDIT = {"responses": 40, "shared_sentence_share": 0.125, "low_relevance_share": 0.05, "relevance_threshold": 0.35,
         "rewrite_grammar_errors": 2, "held_out_leaks": 0, "odd_new_share": 0.5, "odd_new_count": 7}
DROPPED = {"near_duplicate": 3, "no_fact_to_rewrite": 2}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A grounded construct with the fake teacher (no model), stats extended with the audit keys."""
    root = tmp_path_factory.mktemp("inspect")
    project_dir = write_project(root / "person")
    overrides = ["teacher=fake", "construct.mode=grounded"]
    project = load_project(project_dir, overrides=overrides)
    run(project, ["ingest", "construct"])
    stats_path = project.output / "construct" / "stats.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    stats.update(dropped=DROPPED, audit=AUDIT)
    stats_path.write_text(json.dumps(stats), encoding="utf-8")
    return {"dir": project_dir, "project": project, "stats": stats, "set": [a for o in overrides for a in ("--set", o)]}


def _inspect(built: dict[str, Any], capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, str]:
    main(["inspect", str(built["dir"]), *built["set"], *extra])
    captured = capsys.readouterr()
    page = (built["project"].output / "construct" / "audit.html").read_text(encoding="utf-8")
    return page, captured.out + captured.err


def test_page_and_summary_show_samples_reasons_and_figures(built: dict[str, Any],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    page, terminal = _inspect(built, capsys, "--per-group", "2")
    project, stats = built["project"], built["stats"]
    ws = Workspace.of(project)
    samples, passages = ws.samples(), {p.id: p for p in ws.passages()}
    shown = [s for group in pick_samples(project, samples, 2).values() for s in group]
    assert shown and all(len(g) <= 2 for g in pick_samples(project, samples, 2).values())
    assert "Test Person" in page and "grounded" in page
    for sample in shown:
        for text in (sample.question, sample.response):
            assert html.escape(text) in page
        for part, origin in sample.meta["origin"].items():
            assert html.escape(f"{part}: {origin}") in page
        if sample.seed_id:
            seed = passages[sample.seed_id]
            assert html.escape(seed.text) in page and f"{seed.source}:{seed.line}" in page
        for key, value in meta_extras(sample):
            assert html.escape(f"{key}: {value}") in page
    assert {"stance", "premise"} <= {key for s in shown for key, _ in meta_extras(s)}
    for reason in [*DROPPED, *stats["rejected"]]:
        assert reason in page
    for text in ("12.5%", "5.0%", "0.35", "odd_new_share", "50.0%", "odd_new_count", "DPO negative:"):
        assert text in page
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    # the terminal gets the counts, the reasons, the figures and the path
    flat = " ".join(terminal.split())
    for text in ("Samples", "ordinary", "induced", "near_duplicate", "Rejected teacher outputs", "12.5%", "0.35",
                 "audit.html"):
        assert text in flat, text
    assert str(project.output / "construct" / "audit.html") in terminal.replace("\n", "")


def test_choice_is_seeded_and_deterministic(built: dict[str, Any]) -> None:
    project = built["project"]
    ws = Workspace.of(project)
    samples, negatives, passages = ws.samples(), ws.negatives(), ws.passages()
    args = (project, samples, negatives, passages, built["stats"])
    assert render_audit_page(*args, per_group=3) == render_audit_page(*args[:1], list(reversed(samples)), *args[2:],
                                                                      per_group=3)
    other_seed = load_project(built["dir"], overrides=["teacher=fake", "seed=7"])
    first = [s.id for g in pick_samples(project, samples, 1).values() for s in g]
    second = [s.id for g in pick_samples(other_seed, samples, 1).values() for s in g]
    assert first != second
    assert all(g == [] for g in pick_samples(project, samples, 0).values())


def test_older_stats_show_n_a(built: dict[str, Any]) -> None:
    project = built["project"]
    ws = Workspace.of(project)
    stats = {k: v for k, v in built["stats"].items() if k not in ("dropped", "audit", "rejected")}
    page = render_audit_page(project, ws.samples(), [], ws.passages(), stats)
    assert page.count("n/a") >= 8  # six audit figures and both reason tables
    assert "persllm construct PROJECT --force" in page
    assert format_figure("x_share", None) == "n/a" and format_figure("x_share", 0.2) == "20.0%"
    assert format_figure("count", 3) == "3" and format_figure("threshold", 0.35) == "0.35"


def test_missing_construct_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_project(tmp_path / "p")
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(root), "--set", "teacher=fake"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Error:" in err and f"run `persllm construct {root}` first" in err
    assert not (root / "out" / "construct" / "audit.html").exists()


@needs_chromium
def test_page_opens_in_headless_chromium_without_errors(built: dict[str, Any],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    _inspect(built, capsys)
    ws = Workspace.of(built["project"])
    question = next(s for g in pick_samples(built["project"], ws.samples(), 5).values() for s in g).question
    with chromium_page(built["project"].output / "construct" / "audit.html") as (page, problems):
        text = page.inner_text("body")
        sections = {key: page.locator(f"section#{key}").count()
                    for key in ("counts", "audit", "dropped", "rejected", "samples")}
        cards = page.locator("article.sample").count()
    assert problems == []
    assert all(n == 1 for n in sections.values()), sections
    assert cards > 0
    assert "Data audit of Test Person" in text and " ".join(question.split()) in " ".join(text.split())
