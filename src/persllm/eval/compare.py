"""`persllm compare`: two eval reports side by side, and whether their judged numbers can be compared at all.

Judged numbers (accuracy, win rates, interview scores) only mean the same thing under the same judge: the same spec,
the same model behind it (the id the endpoint reported) and the same judge prompts. When any of those differ, the
comparison says so before any number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from persllm.errors import DataError, PersllmError
from persllm.eval.render import fmt

NOT_COMPARABLE = "judged numbers are not comparable"


def load_report(path: Path) -> dict[str, Any]:
    """A report.json, given its path, an eval output folder, or a project directory (its eval stage's report)."""
    file = _report_file(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"no report at {file}; run `persllm eval` first, or name a report.json") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{file} is not a readable report.json ({exc}); re-run `persllm eval --force`") from exc
    if not isinstance(data, dict) or "models" not in data or "judge" not in data:
        raise DataError(f"{file} is not a persllm eval report (no 'models' or 'judge'); name a report.json written "
                        "by `persllm eval`")
    return data


def _report_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    if (path / "report.json").is_file():
        return path / "report.json"
    if (path / "persona.yaml").is_file():
        from persllm.config import load_project
        from persllm.workspace import Workspace

        try:
            return Workspace.of(load_project(path)).stage_dir("eval") / "report.json"
        except PersllmError as exc:
            raise DataError(f"{path}: cannot find its eval report: {exc}") from exc
    raise DataError(f"{path} holds neither report.json nor persona.yaml; name a report.json or a project directory")


def judge_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between the two reports' judges (spec, reported model id, prompt version); empty if nothing."""
    ja, jb = a.get("judge") or {}, b.get("judge") or {}
    if not ja.get("enabled") and not jb.get("enabled"):
        return []
    if not ja.get("enabled") or not jb.get("enabled"):
        return [f"judge {_judge_name(ja)} vs {_judge_name(jb)}"]
    out = []
    for key, label in (("model", "spec"), ("reported_model", "reported model"), ("prompt_version", "prompt version")):
        va, vb = ja.get(key), jb.get(key)
        if va is None or vb is None:  # an older report, or a backend that reports no id: not a known difference
            continue
        if _ids(va) != _ids(vb):
            out.append(f"{label} {_show(va)} vs {_show(vb)}")
    for name, judge in (("A", ja), ("B", jb)):
        if isinstance(judge.get("reported_model"), list):
            out.append(f"report {name}'s judge endpoint itself reported several model ids")
    return out


def unverified(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Judge facts one report lacks, so sameness cannot be confirmed (not a difference)."""
    out = []
    for name, report in (("A", a), ("B", b)):
        judge = report.get("judge") or {}
        if judge.get("enabled") and judge.get("reported_model") is None:
            out.append(f"report {name} records no model id reported by its judge, so the model behind "
                       f"{judge.get('model')} cannot be confirmed")
    return out


def _judge_name(judge: dict[str, Any]) -> str:
    return str(judge.get("model")) if judge.get("enabled") else "none"


def _ids(value: Any) -> tuple[str, ...]:
    return tuple(sorted(value)) if isinstance(value, list) else (str(value),)


def _show(value: Any) -> str:
    return "[" + ", ".join(value) + "]" if isinstance(value, list) else str(value)


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    """Rows [model, measure, A, B] of headline numbers for every model in either report."""
    names = [m["name"] for m in a["models"]] + [m["name"] for m in b["models"] if m["name"] not in
                                                 {x["name"] for x in a["models"]}]
    rows = []
    for model in names:
        ha, hb = headlines(a, model), headlines(b, model)
        for measure in list(ha) + [k for k in hb if k not in ha]:
            rows.append([model, measure, ha.get(measure, "-"), hb.get(measure, "-")])
    return rows


def headlines(report: dict[str, Any], model: str) -> dict[str, str]:
    """Measure -> formatted value for one model ({} when the report did not evaluate it); judged ones say so."""
    if model not in {m["name"] for m in report["models"]}:
        return {}
    out: dict[str, str] = {}
    probes = (report.get("probes") or {}).get("models", {}).get(model, {}).get("overall") or {}
    if probes:
        out["probe pass"] = f"{probes.get('passed', 0)}/{probes.get('n', 0)} ({_pct(probes.get('mean'))})"
    precision = report.get("precision") or {}
    ppl = (precision.get("perplexity") or {}).get(model) or {}
    out["perplexity"] = fmt(ppl.get("overall")) if "overall" in ppl else "n/a"
    for aspect, value in ((precision.get("accuracy") or {}).get("models", {}).get(model) or {}).items():
        out[f"judge accuracy: {aspect} (0-5)"] = _estimate(value)
    ranking = (report.get("ranking") or {}).get("models", {}).get(model)
    if ranking:
        out["judge win rate"] = _estimate(ranking.get("win_rate"))
    interview = report.get("interview") or {}
    if interview.get("enabled"):
        for dim, value in interview["models"].get(model, {}).get("dimensions", {}).items():
            out[f"judge interview: {dim} (1-7)"] = _estimate(value)
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _estimate(value: dict[str, Any] | None) -> str:
    """The report's 'mean [low, high] n=N', and how many items the judge left unscored."""
    text = fmt(value) if value and value.get("mean") is not None else "n/a"
    return text + (f" ({value['missing']} missing)" if value and value.get("missing") else "")
