"""Interviews (Character-LLM): the question file, answers from every model, 1-7 rubric verdicts, report and page."""

from __future__ import annotations

import json
import math
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from conftest import write_project
from eval_helpers import TINY_YAML, prepare_workspace
from persllm.backends.base import Completion
from persllm.backends.fake import FakeBackend
from persllm.config import load_project
from persllm.errors import DataError
from persllm.eval import evaluate, fingerprint_config, summary_rows
from persllm.eval.interview import DIMENSIONS, load_interview
from persllm.workspace import file_sha256

MODELS = ["openai:alpha", "openai:beta"]
QUESTIONS = [
    {"question": "Where did you study?", "topic": "education", "stage": "early", "id": "study"},
    {"question": "What do you think of machines?", "topic": "values"},
    "Are you a robot?",
]
# The judge's score for alpha's answer to each question (every dimension); beta gets 2, and 1 for stability.
ALPHA = {"Where did you study?": 6, "What do you think of machines?": 4, "Are you a robot?": 5}
JUDGE_ID = "judge-model-2025-01-01"


def persona_reply(model: str):  # type: ignore[no-untyped-def]
    def reply(request: Any) -> str:
        question = request[-1].content
        if model == "openai:alpha":
            return f"[Response] I answer as myself: {question.rstrip('?')} - that I remember well."
        return "[Response] As an AI language model, I have no memories."
    return reply


def judge_reply(request: Any) -> str | Completion:
    text = request[-1].content
    if "Dimension:" not in text:  # the other judged criteria: accuracy, probes, ranking
        return Completion("Winner: A" if "Winner" in text else "Score: 3", model=JUDGE_ID)
    dimension = re.search(r"^Dimension: (\w+)", text, re.MULTILINE).group(1)  # type: ignore[union-attr]
    question = re.search(r"^Interview question: (.*)$", text, re.MULTILINE).group(1)  # type: ignore[union-attr]
    answer = re.search(r"^Answer to rate: (.*)$", text, re.MULTILINE).group(1)  # type: ignore[union-attr]
    if "As an AI" in answer:
        if question == "Are you a robot?" and dimension == "memorization":
            return Completion("I would give it a five out of seven.", model=JUDGE_ID)  # never parses
        return Completion(f"Score: {1 if dimension == 'stability' else 2}\nReason: generic", model=JUDGE_ID)
    return Completion(f"Score: {ALPHA[question]}\nReason: fine", model=JUDGE_ID)


def make_project(root: Path, *overrides: str, questions: list[Any] = QUESTIONS):  # type: ignore[no-untyped-def]
    project_dir = write_project(root / "person", TINY_YAML.format(model="/unused-local-model"))
    (project_dir / "interview.json").write_text(json.dumps(questions, indent=1), encoding="utf-8")
    settings = [f"eval.models={json.dumps(MODELS)}", "eval.ipip=false", "eval.interview=interview.json",
                "eval.judge_items=10", "eval.judge_repeats=2", "eval.judge_retries=1", *overrides]
    return load_project(project_dir, overrides=settings)


def run_eval(project) -> tuple[dict[str, Any], Path, FakeBackend]:  # type: ignore[no-untyped-def]
    ws = prepare_workspace(project)
    judge = FakeBackend(judge_reply)
    evaluate(project, ws, open_model=lambda m: FakeBackend(persona_reply(m.name), name=m.name), judge=judge,
             teacher=FakeBackend(["O: 3\nC: 3\nE: 3\nA: 3\nN: 3"]))
    out = ws.stage_dir("eval")
    return json.loads((out / "report.json").read_text(encoding="utf-8")), out, judge


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    project = make_project(tmp_path_factory.mktemp("interview"))
    report, out, judge = run_eval(project)
    return {"report": report, "out": out, "judge": judge, "project": project}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval computed here, independently of persllm's metrics (t for 2 and 4 df)."""
    mean = statistics.mean(values)
    half = {3: 4.303, 5: 2.776}[len(values)] * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def test_every_model_answers_every_question_at_its_stages(evaluated: dict[str, Any]) -> None:
    answers = [json.loads(line) for line in (evaluated["out"] / "answers.jsonl").read_text().splitlines()]
    asked = sorted((a["model"], a["item_id"], a["stage"]) for a in answers if a["purpose"] == "interview_q")
    expected = sorted((m, q, s) for m in MODELS for q, s in [("study", "early"), ("q2", "early"), ("q2", "late"),
                                                              ("q3", "early"), ("q3", "late")])
    assert asked == expected
    assert all(a["temperature"] == 0.0 for a in answers if a["purpose"] == "interview_q")
    # The IPIP open questions keep their own purpose (IPIP is off here, so there are none).
    assert not [a for a in answers if a["purpose"] == "interview"]


def test_judge_prompt_has_persona_stage_material_question_and_answer(evaluated: dict[str, Any]) -> None:
    prompts = [r[-1].content for r in evaluated["judge"].calls if "Dimension:" in r[-1].content]
    # One prompt per model, answer and dimension (2 x 5 x 5); each sent once per repeat, plus the retries of the
    # 2 x 2 unparseable replies.
    assert len(set(prompts)) == 50 and len(prompts) == 50 * 2 + 4
    study = [p for p in prompts if "Interview question: Where did you study?" in p]
    assert {re.search(r"^Dimension: (\w+)", p, re.MULTILINE).group(1) for p in study} == set(DIMENSIONS)  # type: ignore[union-attr]
    early = study[0]
    assert "Test Person" in early and "in 1900" in early
    assert "Technical University" in early  # the early stage's most relevant passage
    assert "Siemens Ring" not in early  # material of another stage is never shown
    assert "1 to 7" in early


def test_report_has_per_dimension_means_with_intervals(evaluated: dict[str, Any]) -> None:
    section = evaluated["report"]["interview"]
    assert section["enabled"] and section["questions"] == 3 and section["answers"] == 5
    assert section["dimensions"] == list(DIMENSIONS) and section["scale"] == [1, 7]
    alpha = section["models"]["openai:alpha"]
    assert alpha["judged_answers"] == 5
    mean, low, high = t_interval([6, 4, 4, 5, 5])  # study early; machines early, late; robot early, late
    for dim in DIMENSIONS:
        got = alpha["dimensions"][dim]
        assert got["n"] == 5 and got["missing"] == 0
        assert got["mean"] == pytest.approx(mean, abs=1e-3)
        assert got["low"] == pytest.approx(low, abs=1e-3) and got["high"] == pytest.approx(high, abs=1e-3)
    assert alpha["by_stage"]["late"]["memorization"]["mean"] == pytest.approx(4.5, abs=1e-3)
    assert alpha["by_topic"]["education"]["values"]["mean"] == 6.0
    beta = section["models"]["openai:beta"]["dimensions"]
    assert beta["stability"]["mean"] == 1.0 and beta["stability"]["n"] == 5
    assert beta["values"]["mean"] == 2.0


def test_unparseable_judge_reply_is_missing_never_a_score(evaluated: dict[str, Any]) -> None:
    memorization = evaluated["report"]["interview"]["models"]["openai:beta"]["dimensions"]["memorization"]
    assert memorization["n"] == 3 and memorization["missing"] == 2  # the robot question at both stages
    assert memorization["mean"] == 2.0  # only the parsed verdicts
    verdicts = [json.loads(line) for line in (evaluated["out"] / "verdicts.jsonl").read_text().splitlines()]
    robot = [v for v in verdicts if v["criterion"] == "interview" and v["model"] == "openai:beta"
             and v["item_id"].startswith("q3/") and v["item_id"].endswith("/memorization")]
    assert robot and all(v["status"] == "unparseable" and v["value"] is None for v in robot)
    assert len(robot) == 2 * 2 * 2  # two stages x two repeats x (first attempt + one retry)


def test_summary_row_per_model_and_judge_pinning(evaluated: dict[str, Any]) -> None:
    report = evaluated["report"]
    rows = [r for r in summary_rows(report) if r[1] == "interview (1-7)"]
    assert [r[0] for r in rows] == MODELS
    assert "memorization 2.00 (2 missing)" in rows[1][2] and "stability 4.80" in rows[0][2]
    assert report["judge"]["reported_model"] == JUDGE_ID
    assert "reported_model_warning" not in report["judge"]
    assert "interview" in report["judge"]["prompts"] and "interview_rubric.hallucination" in report["judge"]["prompts"]


class Tables(HTMLParser):
    """Rows of the table with a given id inside a section, and the section's heading."""

    def __init__(self, section: str, table: str) -> None:
        super().__init__()
        self.section, self.table = section, table
        self.in_section = self.in_table = self.in_cell = self.in_h2 = False
        self.heading, self.rows, self.notes = "", [], []  # type: ignore[var-annotated]
        self.depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self.in_section = attributes.get("id") == self.section
        if not self.in_section:
            return
        if tag == "h2":
            self.in_h2 = True
        if tag == "table" and attributes.get("id") == self.table:
            self.in_table = True
        if self.in_table and tag == "tr":
            self.rows.append([])
        if self.in_table and tag in ("td", "th"):
            self.in_cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.in_section = False
        if tag == "table":
            self.in_table = False
        if tag in ("td", "th"):
            self.in_cell = False
        if tag == "h2":
            self.in_h2 = False

    def handle_data(self, data: str) -> None:
        if self.in_section and self.in_h2:
            self.heading += data
        elif self.in_section and self.in_cell:
            self.rows[-1][-1] += data
        elif self.in_section:
            self.notes.append(data)


def parse(html: str, section: str = "interview", table: str = "interview-table") -> Tables:
    parser = Tables(section, table)
    parser.feed(html)
    return parser


def test_html_section_has_a_table_per_model_and_dimension(evaluated: dict[str, Any]) -> None:
    page = parse((evaluated["out"] / "report.html").read_text(encoding="utf-8"))
    assert page.heading == "Interview (Character-LLM rubric)"
    header, *rows = page.rows
    assert header == ["model", "answers judged", *DIMENSIONS, "missing verdicts"]
    table = {r[0]: dict(zip(header, r)) for r in rows}
    assert set(table) == set(MODELS)
    mean, low, high = t_interval([6, 4, 4, 5, 5])
    assert table["openai:alpha"]["memorization"] == f"{mean:.2f} [{low:.2f}, {high:.2f}] n=5"
    assert table["openai:beta"]["stability"] == "1.00 [1.00, 1.00] n=5"
    assert table["openai:beta"]["missing verdicts"] == "2"
    assert "<a href='#interview'>" in (evaluated["out"] / "report.html").read_text(encoding="utf-8")


def test_without_a_judge_the_section_says_why(tmp_path: Path) -> None:
    project = make_project(tmp_path, "eval.judge_items=0")
    report, out, judge = run_eval(project)
    section = report["interview"]
    assert section["enabled"] is False and "eval.judge_items is 0" in section["reason"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert not [a for a in answers if a["purpose"] == "interview_q"] and judge.calls == []
    page = parse((out / "report.html").read_text(encoding="utf-8"))
    assert page.rows == [] and any("eval.judge_items is 0" in n for n in page.notes)
    rows = [r for r in summary_rows(report) if r[1] == "interview (1-7)"]
    assert len(rows) == 2 and all(r[2].startswith("unavailable: no judge") for r in rows)


def test_fingerprint_includes_the_interview_file(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    path = project.root / "interview.json"
    first = fingerprint_config(project)
    assert first["interview_file"] == file_sha256(path)
    path.write_text(json.dumps(QUESTIONS + ["One more?"]), encoding="utf-8")
    assert fingerprint_config(project)["interview_file"] != first["interview_file"]


STAGES = ["early", "late"]


def test_valid_files_json_list_and_jsonl(tmp_path: Path) -> None:
    listed = tmp_path / "q.json"
    listed.write_text(json.dumps(QUESTIONS, indent=2), encoding="utf-8")
    questions = load_interview(listed, STAGES)
    assert [(q.id, q.stages, q.topic) for q in questions] == [("study", ("early",), "education"),
                                                               ("q2", ("early", "late"), "values"),
                                                               ("q3", ("early", "late"), "")]
    lines = tmp_path / "q.jsonl"
    lines.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n\n", encoding="utf-8")
    assert load_interview(lines, STAGES) == questions


def test_every_problem_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    lines = ['"Fine question?"', '{"question": "unterminated', '{"questoin": "Typo?"}',
             '{"question": "Middle?", "stage": "middle"}', '{"question": "Again?", "id": "q1"}', "42",
             '{"question": "   "}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_interview(path, STAGES)
    message = str(info.value)
    assert "docs/interviews.md" in message and "problem(s)" in message
    assert f"{path}:2: not valid JSON" in message
    assert f"{path}:3: unknown key 'questoin' (did you mean 'question'?)" in message
    assert f"{path}:4: stage 'middle' is not a stage of this project" in message
    assert f"{path}:5: id 'q1' is already used on line 1" in message
    assert f"{path}:6: expected a question string or a JSON object, got int" in message
    assert f"{path}:7: 'question' must be a non-empty string" in message
    assert f"{path}:1:" not in message  # the valid line is not blamed


def test_json_list_problems_name_the_item_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  "ok?",\n  {"question": "When?", "stage": "later"},\n  {"question": 3}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_interview(path, STAGES)
    assert f"{path}:3: stage 'later'" in str(info.value) and f"{path}:4: 'question' must be" in str(info.value)
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  "ok?"\n  "missing comma?"\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3: not valid JSON"):
        load_interview(bad, STAGES)


def test_empty_missing_and_broken_files_fail_before_any_model(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no questions"):
        load_interview(empty, STAGES)
    with pytest.raises(DataError, match="interview file not found"):
        load_interview(tmp_path / "nope.json", STAGES)
    project = make_project(tmp_path, questions=[{"question": "Where?", "stage": "nowhere"}])
    opened: list[str] = []
    with pytest.raises(DataError, match="stage 'nowhere'"):
        evaluate(project, prepare_workspace(project), open_model=lambda m: opened.append(m.name),  # type: ignore[arg-type,func-returns-value]
                 judge=FakeBackend(), teacher=FakeBackend())
    assert opened == []
