"""The SFT/DPO smoke tests in the eval report: read from the finished stages, shown as a warning box when failed."""

from __future__ import annotations

from pathlib import Path

from persllm.eval import training_smoke
from persllm.eval.report_html import _smoke
from persllm.workspace import Workspace

FAILED = {"ok": False, "problems": ["no_stop", "repetition"], "max_new_tokens": 96, "outputs": [
    {"question": "How does a steam engine work?", "text": "[Analysis] Steam.\n[Response] Steam.stepToken\n[Analysis]",
     "tokens": 96, "stopped": False, "problems": ["no_stop", "repetition"]}]}
PASSED = {"ok": True, "problems": [], "outputs": [
    {"question": "Who are you?", "text": "[Response] Ada.", "tokens": 5, "stopped": True, "problems": []}]}


def finished(ws: Workspace, stage: str, smoke: dict | None) -> None:
    ws.stage_dir(stage).mkdir(parents=True)
    ws.finish(stage, "fp", {"steps": 2} | ({"smoke": smoke, "smoke_warning": not smoke["ok"]} if smoke else {}))


def test_smoke_results_come_from_the_finished_stages(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "out")
    assert training_smoke(ws) == {}
    finished(ws, "sft", FAILED)
    finished(ws, "dpo", PASSED)
    smoke = training_smoke(ws)
    assert set(smoke) == {"sft", "dpo"}
    assert smoke["sft"]["ok"] is False and smoke["sft"]["problems"] == ["no_stop", "repetition"]
    assert smoke["sft"]["example"]["question"] == "How does a steam engine work?"
    assert "stepToken" in smoke["sft"]["example"]["text"]
    assert smoke["sft"]["path"] == str(ws.stage_dir("sft") / "smoke.json")
    assert smoke["dpo"]["ok"] is True and smoke["dpo"]["example"]["text"] == "[Response] Ada."
    (ws.stage_dir("dpo") / "manifest.json").unlink()  # an unfinished stage is not reported
    assert set(training_smoke(ws)) == {"sft"}


def test_stats_without_a_smoke_test_are_not_a_failure(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "out")
    finished(ws, "sft", None)
    assert training_smoke(ws) == {}


def test_report_shows_a_warning_box_only_when_a_smoke_test_failed(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "out")
    finished(ws, "sft", FAILED)
    finished(ws, "dpo", PASSED)
    html = _smoke({"smoke": training_smoke(ws)})
    assert html.startswith("<div class='warn' id='smoke'>") and "Smoke test failed" in html
    assert "<b>sft</b>: no_stop, repetition" in html and "stepToken" in html and "<b>dpo</b>" not in html
    quiet = _smoke({"smoke": {"dpo": training_smoke(ws)["dpo"]}})
    assert "class='warn'" not in quiet and "passed: dpo" in quiet
    assert _smoke({}) == ""
