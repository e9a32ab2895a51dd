"""The one-screen terminal summary and the compact stats the pipeline stores (headline numbers per model)."""

from __future__ import annotations

from typing import Any

from persllm.eval.criteria import CRITERIA
from persllm.eval.criteria.probes import paired_text
from persllm.eval.render import ci, num, pct


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows [model, criterion, result]: one per model and criterion, short enough for one screen."""
    models = [m["name"] for m in report["models"]]
    rows = [row for model in models for c in CRITERIA for row in c.summary(report, model)]
    return rows + [row for c in CRITERIA for row in c.summary_after(report)]


def stats(report: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers per model, for stats.json and the run summary."""
    out: dict[str, Any] = {"models": [m["name"] for m in report["models"]], "judge": report["judge"].get("model"),
                           "judge_reliable": report["judge"].get("reliable"), "seconds": report["timings"]["total"],
                           "per_model": {}}
    for model in out["models"]:
        probes = report["probes"]["models"][model]["overall"]
        bleu = report["distinction"]["models"][model]["bleu"]["overall"]
        ranking = report["ranking"].get("models", {}).get(model, {})
        fmt = (report.get("format") or {}).get("models", {}).get(model, {})
        out["per_model"][model] = {
            "probe_pass": probes["mean"], "probe_n": probes["n"], "probe_low": probes["low"],
            "probe_high": probes["high"], "off_format": (fmt.get("rate") or {}).get("mean"), "intra": bleu["intra"]["mean"], "stage": bleu["stage"]["mean"],
            "inter": bleu["inter"]["mean"], "perplexity": report["precision"]["perplexity"][model].get("overall"),
            "rouge_l": report["precision"]["rouge_l"][model]["overall"]["mean"],
            "win_rate": (ranking.get("win_rate") or {}).get("mean"),
        }
    out["paired"] = [p for p in report["probes"].get("paired", []) if p["a"] == out["models"][0]]
    return out


def headline(stats: dict[str, Any]) -> str:
    """One line for the run summary table: probe pass rate and perplexity per model."""
    per = stats.get("per_model", {})
    if not per:
        return "no models evaluated"
    probes = " / ".join(f"{m} {pct({'mean': v['probe_pass']})}"
                        + (f" {ci({'low': v.get('probe_low'), 'high': v.get('probe_high')})}"
                           if v.get("probe_low") is not None else "") for m, v in per.items())
    n = next((v.get("probe_n") for v in per.values() if v.get("probe_n")), None)
    ppl = " / ".join(f"{m} {num(v['perplexity'], 1)}" for m, v in per.items())
    judge = stats.get("judge") or "none"
    paired = "; ".join(f"{p['b']} vs {p['a']} {paired_text(p)}" for p in stats.get("paired", []))
    return (f"probes{f' (n={n})' if n else ''} {probes}" + (f"; {paired}" if paired else "")
            + f"; perplexity {ppl}; judge {judge}" + (" (unreliable)" if stats.get("judge_reliable") is False else ""))
