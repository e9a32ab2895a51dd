"""Chat sessions: training-format prompts, stage switches, hidden analysis while streaming, transcripts, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from persllm.backends.fake import FakeBackend
from persllm.chat import AnswerFilter, Session
from persllm.config import load_project


def test_session_prompts_history_and_stage_switch(project_dir: Path, tmp_path: Path) -> None:
    project = load_project(project_dir)
    fake = FakeBackend(["[Analysis] She recalls Graz. [Response] I was born in Graz.", "[Response] Berlin, of course."])
    session = Session(project, fake, "early")
    assert "".join(session.ask("Where were you born?")) == "[Analysis] She recalls Graz. [Response] I was born in Graz."
    second = session.messages("And then?")
    assert "It is 1900" in second[0].content
    assert [m.content for m in second[1:]] == ["Where were you born?", "I was born in Graz.", "And then?"]
    session.set_stage("late")
    after = session.messages("Where do you live?")
    assert "It is 1930" in after[0].content and len(after) == 2  # the later self never heard the earlier chat
    list(session.ask("Where do you live?"))
    md = session.save(tmp_path / "t.md").read_text()
    assert "I was born in Graz." in md and "Berlin, of course." in md and "analysis:* She recalls Graz." in md
    rows = [json.loads(x) for x in session.save(tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["early", "late"] and rows[0]["answer"] == "I was born in Graz."


@pytest.mark.parametrize("pieces", [["[Analy", "sis] hmm [Resp", "onse] Hello", " there"],
                                    ["[Analysis] hmm [Response]", " Hello there"]])
def test_answer_filter_hides_analysis_while_streaming(pieces: list[str]) -> None:
    hidden = AnswerFilter(show_analysis=False)
    shown = "".join(hidden.feed(p) for p in pieces) + hidden.finish()
    assert shown == "Hello there"
    visible = AnswerFilter(show_analysis=True)
    assert "".join(visible.feed(p) for p in pieces) == "".join(pieces)
    untagged = AnswerFilter(show_analysis=False)
    assert untagged.feed("No tags at all") == "" and untagged.finish() == "No tags at all"


def test_chat_cli_with_tiny_model(project_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    transcript = tmp_path / "chat.jsonl"
    stdin = f"Hello?\n/stage early\nWho are you?\n/save {transcript}\n/quit\n"
    result = subprocess.run([sys.executable, "-m", "persllm", "chat", str(project_dir), "--model", "base",
                             "--set", f"base_model=hf:{tiny_model}", "--max-tokens", "8"],
                            input=stdin, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(x) for x in transcript.read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["late", "early"] and all(r["model"] == "base" for r in rows)


def test_chat_cli_errors(project_dir: Path, tiny_model: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "persllm", "chat", *args], capture_output=True, text=True,
                              timeout=120, input="", check=False)

    missing = run(str(project_dir.parent / "nope"))
    assert missing.returncode == 1 and "no persona.yaml found" in missing.stderr
    stage = run(str(project_dir), "--stage", "middle")
    assert stage.returncode == 1 and "unknown stage 'middle'" in stage.stderr and "early, late" in stage.stderr
    adapter = run(str(project_dir), "--model", "dpo", "--set", f"base_model=hf:{tiny_model}")
    assert adapter.returncode == 1 and "no DPO adapter" in adapter.stderr and "persllm train" in adapter.stderr


def test_the_visible_answer_never_shows_analysis() -> None:
    from persllm import template
    from persllm.chat import AnswerFilter

    assert template.visible_answer("[Analysis] No false premise. Relevant: the engine.") == ""
    assert template.visible_answer("[Analysis] a\n[Response] I am Ada.\n[Analysis] again\n[Response] b") == "I am Ada."
    assert template.visible_answer("I am Ada, plainly.") == "I am Ada, plainly."  # an untagged model is shown whole
    pieces = ["[Anal", "ysis] x\n[Resp", "onse] Hello", " there. [Ana", "lysis] leaked", " more"]
    shown = AnswerFilter(False)
    assert ("".join(shown.feed(p) for p in pieces) + shown.finish()).strip() == "Hello there."
    held = AnswerFilter(False)
    assert "".join(held.feed(p) for p in ["[Response] a [b", "] c"]) + held.finish() == "a [b] c"
    everything = AnswerFilter(True)
    assert "".join(everything.feed(p) for p in pieces) + everything.finish() == "".join(pieces)
