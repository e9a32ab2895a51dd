"""`persllm compare` and judge pinning: reported model ids kept through the cache, and judge changes said first."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner

from persllm.backends.base import Completion
from persllm.backends.fake import FakeBackend
from persllm.backends.openai_compat import OpenAICompatible
from persllm.cli import (
    cli,
    commands,  # noqa: F401  (registers the commands)
)
from persllm.eval.judge import Judge, Task, score_parser
from persllm.prompts import load_prompts
from persllm.types import Message

VALUES = {"name": "Ada", "label": "1835", "question": "Q?", "reference": "R.", "answer": "A.", "aspect": "facts"}


def task(item: str) -> Task:
    return Task("accuracy", "m", item, "accuracy", dict(VALUES), score_parser(0, 5), {"aspect": "knowledge"})


def test_openai_backend_keeps_the_reported_model_id() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"model": "gpt-4o-2024-08-06", "choices": [
            {"message": {"role": "assistant", "content": "Score: 4"}, "finish_reason": "stop"}]})

    backend = OpenAICompatible("gpt-4o", base_url="http://llm.test/v1", transport=httpx.MockTransport(handler))
    assert backend.complete([Message("user", "hi")]).model == "gpt-4o-2024-08-06"


def test_reported_ids_survive_the_cache_and_several_ids_are_all_listed(tmp_path: Path) -> None:
    cache = tmp_path / "judge.sqlite"
    judge = Judge(FakeBackend([Completion("Score: 4", model="judge-v1")]), load_prompts("en"), cache, repeats=1)
    judge.run([task("i1")])
    assert judge.describe()["reported_model"] == "judge-v1"
    again = FakeBackend(["Score: 0"])
    rerun = Judge(again, load_prompts("en"), cache, repeats=1)
    rerun.run([task("i1")])
    assert again.calls == [] and rerun.describe()["reported_model"] == "judge-v1"  # from the cache
    mixed = Judge(FakeBackend([Completion("Score: 4", model="judge-v2"), Completion("Score: 3", model="judge-v1")]),
                  load_prompts("en"), None, repeats=1)
    mixed.run([task("i1"), task("i2")])
    assert mixed.describe()["reported_model"] == ["judge-v1", "judge-v2"]
    silent = Judge(FakeBackend(["Score: 4"]), load_prompts("en"), None, repeats=1)
    silent.run([task("i1")])
    assert silent.describe()["reported_model"] is None


def report(judge_model: str = "openai:gpt-4o", reported: Any = "gpt-4o-2024-08-06", version: str = "en-2026.12.3",
           pass_n: tuple[int, int] = (6, 10), ppl: float | None = 12.5, accuracy: float = 3.4) -> dict[str, Any]:
    """A small report.json with the sections `compare` reads."""
    model = {"name": "sft", "spec": "sft: tiny", "local": True}
    return {
        "persona": "Ada", "created": "2026-01-01 00:00 UTC", "models": [model],
        "judge": {"enabled": True, "model": judge_model, "reported_model": reported, "prompt_version": version},
        "probes": {"models": {"sft": {"overall": {"mean": pass_n[0] / pass_n[1], "low": 0.3, "high": 0.8,
                                                  "n": pass_n[1], "passed": pass_n[0]}}}},
        "precision": {"perplexity": {"sft": {"overall": ppl, "tokens": 40} if ppl else {"unavailable": "remote"}},
                      "accuracy": {"models": {"sft": {"knowledge": {"mean": accuracy, "low": 2.9, "high": 3.9,
                                                                     "n": 8, "missing": 0}}}}},
        "ranking": {"unavailable": "ranking needs at least two models"},
        "interview": {"enabled": True, "models": {"sft": {"dimensions": {
            "stability": {"mean": 6.2, "low": 5.8, "high": 6.6, "n": 5, "missing": 1}}}}},
    }


def invoke(tmp_path: Path, a: dict[str, Any], b: dict[str, Any], as_project: bool = False) -> str:
    path_a, path_b = tmp_path / "a" / "report.json", tmp_path / "b" / "report.json"
    for path, data in ((path_a, a), (path_b, b)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data), encoding="utf-8")
    args = [str(path_a.parent if as_project else path_a), str(path_b)]
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, ["compare", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_same_judge_prints_numbers_side_by_side(tmp_path: Path) -> None:
    out = invoke(tmp_path, report(), report(pass_n=(8, 10), ppl=10.25, accuracy=4.1), as_project=True)
    assert "judge differs" not in out and "not comparable" not in out
    row = next(line for line in out.splitlines() if "probe pass" in line)
    assert row.index("6/10 (60%)") < row.index("8/10 (80%)")
    ppl = next(line for line in out.splitlines() if "perplexity" in line)
    assert "12.50" in ppl and "10.25" in ppl
    acc = next(line for line in out.splitlines() if "judge accuracy: knowledge" in line)
    assert "3.40 [2.90, 3.90] n=8" in acc and "4.10 [2.90, 3.90] n=8" in acc
    assert "judge interview: stability (1-7)" in out and "6.20 [5.80, 6.60] n=5" in out


def test_different_judges_are_said_first(tmp_path: Path) -> None:
    for other, what in ((report(reported="gpt-4o-2024-11-20"), "reported model gpt-4o-2024-08-06 vs gpt-4o-2024-11-20"),
                        (report(judge_model="openai:gpt-4o-mini"), "spec openai:gpt-4o vs openai:gpt-4o-mini"),
                        (report(version="en-2026.12.2"), "prompt version en-2026.12.3 vs en-2026.12.2")):
        out = invoke(tmp_path, report(), other)
        first = out.strip().splitlines()[0]
        assert first.startswith("judge differs:") and what in first, out
        assert first.endswith("judged numbers are not comparable")


def test_no_judge_and_mixed_ids_are_differences_and_unknown_ids_a_note(tmp_path: Path) -> None:
    none = copy.deepcopy(report())
    none["judge"] = {"enabled": False, "model": None, "reason": "no judge: eval.judge_items is 0"}
    assert invoke(tmp_path, report(), none).splitlines()[0].startswith("judge differs: judge openai:gpt-4o vs none")
    mixed = invoke(tmp_path, report(), report(reported=["a-1", "a-2"]))
    assert "report B's judge endpoint itself reported several model ids" in mixed.splitlines()[0]
    unknown = invoke(tmp_path, report(reported=None), report())
    assert "judge differs" not in unknown and "report A records no model id reported by its judge" in unknown


def test_not_a_report_fails_with_a_clear_message(tmp_path: Path) -> None:
    bogus = tmp_path / "x.json"
    bogus.write_text("{}", encoding="utf-8")
    result = CliRunner().invoke(cli, ["compare", str(bogus), str(bogus)])
    assert result.exit_code != 0 and "not a persllm eval report" in str(result.exception)


def test_project_directories_find_their_eval_report(tmp_path: Path) -> None:
    from conftest import write_project

    project = write_project(tmp_path / "person")
    (project / "out" / "eval").mkdir(parents=True)
    (project / "out" / "eval" / "report.json").write_text(json.dumps(report(pass_n=(1, 4))), encoding="utf-8")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(report()), encoding="utf-8")
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, ["compare", str(project), str(other)])
    assert result.exit_code == 0, result.output
    assert "1/4 (25%)" in result.output and "6/10 (60%)" in result.output
