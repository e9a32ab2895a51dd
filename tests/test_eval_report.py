"""`evaluate` end to end on the tiny model: every output file, the report's content, and the page in Chromium."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import chromium_page, needs_chromium, write_project
from eval_helpers import TINY_YAML, make_adapter, prepare_workspace
from persllm.backends.fake import FakeBackend
from persllm.config import load_project
from persllm.eval import evaluate, headline, summary_rows
from persllm.eval.report_html import SECTIONS

USER_PROBES = [
    {"id": "u-born", "kind": "knowledge", "stage": "early", "question": "Where were you born?",
     "expect_any": ["Graz"], "reference": "I was born in Graz."},
    {"id": "u-ai", "kind": "identity", "question": "Are you a robot?", "reject_any": ["i am a robot"]},
]


def judge_reply(request: Any) -> str:
    text = request[-1].content
    if "Winner" in text:
        return "Winner: A"  # position-biased: the order swap must turn this into ties
    if "Statement about" in text:
        return "Score: 4"
    return "Score: 3" if "held" not in text else "unparseable"


@pytest.fixture(scope="module")
def evaluated(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval-e2e")
    project_dir = write_project(root / "person", TINY_YAML.format(model=tiny_model))
    probe_file = root / "user_probes.jsonl"
    probe_file.write_text("\n".join(json.dumps(p) for p in USER_PROBES) + "\n", encoding="utf-8")
    peer_dir = write_project(root / "peer", TINY_YAML.format(model=tiny_model).replace("Test Person", "Other Person"))
    (project_dir / "persona.yaml").write_text((project_dir / "persona.yaml").read_text()
                                             + f"peers: [{peer_dir}]\n", encoding="utf-8")
    project = load_project(project_dir, overrides=['eval.models=["base","sft"]', f"eval.probes={probe_file}"])
    ws = prepare_workspace(project)
    make_adapter(tiny_model, project.output / "sft" / "adapter")
    judge, teacher = FakeBackend(judge_reply), FakeBackend(["O: 4\nC: 3\nE: 2\nA: 4\nN: 2"])
    stats = evaluate(project, ws, judge=judge, teacher=teacher)
    out = ws.stage_dir("eval")
    return {"stats": stats, "out": out, "report": json.loads((out / "report.json").read_text()), "project": project}


def test_outputs_and_stats(evaluated: dict[str, Any]) -> None:
    out, stats = evaluated["out"], evaluated["stats"]
    for name in ("report.json", "report.html", "answers.jsonl", "verdicts.jsonl", "probes.jsonl"):
        assert (out / name).is_file(), name
    assert set(stats["per_model"]) == {"base", "sft"}
    line = headline(stats)
    n = stats["per_model"]["base"]["probe_n"]
    assert f"probes (n={n}) base" in line and "sft vs base" in line and "McNemar p=" in line, line
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert {a["model"] for a in answers} == {"base", "sft"}
    assert all("seed" in a and a["text"] is not None for a in answers)
    assert {a["sample"] for a in answers if a["purpose"] == "sample"} == {1, 2}
    assert any(a["purpose"] == "peer" and a["persona"] == "other-person" for a in answers)
    probes = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert {"u-born", "u-ai"} <= {p["id"] for p in probes}


def test_report_covers_every_criterion(evaluated: dict[str, Any]) -> None:
    report = evaluated["report"]
    assert report["seeds"]["sampled"]["seeds"] == [42, 43]
    assert report["judge"]["model"] == "fake" and report["judge"]["prompts"]["accuracy"]
    base = report["distinction"]["models"]["base"]["bleu"]["overall"]
    assert base["intra"]["n"] > 0 and base["stage"]["n"] > 0 and base["inter"]["n"] > 0  # peer played by base
    assert report["distinction"]["models"]["sft"]["bleu"]["overall"]["inter"]["n"] == 0  # peer has no adapter
    assert any("no SFT adapter" in n for n in report["distinction"]["models"]["sft"]["inter_notes"])
    assert report["distinction"]["embedding_note"]
    probes = report["probes"]["models"]["base"]
    assert {"knowledge", "identity"} <= set(probes["by_kind"])
    assert all({"answer", "reasons", "question"} <= set(f) for f in probes["failures"])
    assert set(report["anti_induction"]["models"]["base"]) == {
        "corrected_false_premises", "cannot_know_after_stage", "not_there_long_before", "recalls_own_past",
        "earlier_stage_kept", "identity_break"}
    paired = report["probes"]["paired"]
    assert [(x["a"], x["b"]) for x in paired] == [("base", "sft")]
    shared = [k for k in probes["results"] if k in report["probes"]["models"]["sft"]["results"]]
    assert paired[0]["n"] == len(shared) == len(report["probes"]["models"]["sft"]["results"])
    assert paired[0]["difference"]["low"] <= paired[0]["difference"]["mean"] <= paired[0]["difference"]["high"]
    assert 0 <= paired[0]["p_value"] <= 1
    assert probes["overall"]["low"] is not None and probes["overall"]["n"] == len(probes["results"])
    # The tiny base model has only persllm's template: the base baseline is prompted few-shot, and says so.
    prompting = {m["name"]: m["prompting"] for m in report["models"]}
    assert prompting["base"].startswith("few-shot") and prompting["sft"].startswith("chat template")
    fmt = report["format"]["models"]["sft"]
    assert fmt["rate"]["n"] == len(probes["results"]) + report["data"]["heldout_questions"]
    assert sum(fmt["counts"].values()) >= fmt["rate"]["mean"] * fmt["rate"]["n"] - 1e-9
    ipip = report["ipip"]
    assert ipip["targets"]["early"]["profile"] == {"O": 4.0, "C": 3.0, "E": 2.0, "A": 4.0, "N": 2.0}
    stage = ipip["models"]["sft"]["stages"]["early"]
    assert stage["method"] == "loglik" and all(24 <= v <= 120 for v in stage["domain_sum"].values())
    assert stage["interview"]["answered"] == 2  # eval.ipip_interview_items, each rated 4 by the judge
    assert ipip["models"]["base"]["target_distance"]["early"] is not None
    assert "early vs late" in ipip["models"]["base"]["stage_distance"]
    assert "other-person" in ipip["models"]["base"]["persona_distance"]
    accuracy = report["precision"]["accuracy"]["models"]["base"]
    assert accuracy["knowledge"]["mean"] == 3.0
    assert report["precision"]["perplexity"]["base"]["overall"] > 1
    assert report["precision"]["rouge_l"]["sft"]["overall"]["n"] > 0
    ranking = report["ranking"]
    assert ranking["pairs"][0]["ties"] > 0 and ranking["pairs"][0]["a_wins"] == 0  # position bias cancelled
    rows = summary_rows(report)
    assert {r[1] for r in rows} >= {"probes", "off format", "paired probes", "distinction (BLEU)", "anti-induction",
                                    "Big Five", "precision", "ranking"}
    assert all(len(r) == 3 for r in rows)


def test_unparseable_judge_replies_are_missing_not_scores(evaluated: dict[str, Any]) -> None:
    verdicts = [json.loads(line) for line in (evaluated["out"] / "verdicts.jsonl").read_text().splitlines()]
    assert all(v["value"] is None for v in verdicts if v["status"] != "ok")
    assert evaluated["report"]["judge"]["verdicts"]["replies"] == sum(1 for v in verdicts if v["role"] == "judge")


@needs_chromium
def test_html_opens_in_headless_chromium_without_errors(evaluated: dict[str, Any]) -> None:
    with chromium_page(evaluated["out"] / "report.html") as (page, problems):
        text = page.inner_text("body")
        sections = {key: page.locator(f"section#{key}").count() for key, _ in SECTIONS}
        svgs = page.locator("svg").count()
    assert problems == []
    assert all(n == 1 for n in sections.values()), sections
    assert svgs >= 6
    assert "Judge: fake" in text and "seeds 42, 43" in text
    for title in ("Distinction", "Probes", "Anti-induction", "IPIP-NEO-120", "Precision", "Ranking",
                  "Paired comparisons on the same probes", "Answer format", "few-shot"):
        assert title in text


def test_format_failures_count_analysis_shown_as_the_answer() -> None:
    from persllm.eval.criteria.answer_format import analysis_phrases, format_failures
    from persllm.eval.generate import Answer
    from persllm.prompts import load_prompts

    def answer(key: str, text: str, finish: str = "stop") -> Answer:
        from persllm import template
        return Answer("m", key, "probe", key, "x", "early", "Q?", text, template.visible_answer(text), 0, 0.0,
                      finish=finish)

    phrases = analysis_phrases(load_prompts("en").get("grounded.analysis"), "Ada Lovelace")
    answers = [answer("ok", "[Analysis] a\n[Response] I met Mr Babbage in 1833."),
               answer("second", "[Response] I met him.\n[Analysis] Ada Lovelace answers from memory."),
               answer("leak", "[Response] I met him. Ada Lovelace answers from memory."),
               answer("opens", "[Response] No false premise. Relevant: the engine."),
               answer("long", "[Response] I met him and then I", finish="length"),
               answer("only", "[Analysis] No false premise."),
               answer("notag", "I met him.")]
    result = format_failures(answers, True, "Ada Lovelace", "", phrases)
    assert result["rate"]["n"] == 7 and result["rate"]["mean"] == round(6 / 7, 3)
    assert result["counts"] == {"no_stop": 1, "no_response": 2, "analysis_in_answer": 3, "empty": 1}
    plain = format_failures([answers[-1]], False, "Ada Lovelace", "", phrases)  # a few-shot baseline's plain text
    assert plain["rate"]["mean"] == 0.0
    # response-only format: any tag is the model leaving it
    tagged = format_failures([answer("tag", "I met him.\n[Analysis] more")], False, "Ada Lovelace", "", phrases)
    assert tagged["counts"]["analysis_in_answer"] == 1
