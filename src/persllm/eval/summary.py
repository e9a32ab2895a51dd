"""The one-screen terminal summary and the compact stats the pipeline stores (headline numbers per model)."""

from __future__ import annotations

from typing import Any

from persllm.eval import ipip


def _pct(value: dict[str, Any] | None) -> str:
    if not value or value.get("mean") is None:
        return "n/a"
    return f"{100 * value['mean']:.0f}%"


def _num(value: Any, digits: int = 2) -> str:
    mean = value.get("mean") if isinstance(value, dict) else value
    return "n/a" if mean is None else f"{mean:.{digits}f}"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows [model, criterion, result]: one per model and criterion, short enough for one screen."""
    rows = []
    for model in [m["name"] for m in report["models"]]:
        probes = report["probes"]["models"][model]
        kinds = ", ".join(f"{k} {_pct(v)}" for k, v in probes["by_kind"].items())
        rows.append([model, "probes", f"{probes['overall'].get('passed', 0)}/{probes['overall']['n']} pass "
                     f"({_pct(probes['overall'])} {_ci(probes['overall'])}); {kinds}"])
        fmt = (report.get("format") or {}).get("models", {}).get(model)
        if fmt:
            counts = ", ".join(f"{k} {v}" for k, v in fmt["counts"].items() if v)
            rows.append([model, "off format", f"{_pct(fmt['rate'])} {_ci(fmt['rate'])} of "
                         f"{fmt['rate']['n']} answers" + (f" ({counts})" if counts else "")])
        bleu = report["distinction"]["models"][model]["bleu"]["overall"]
        rows.append([model, "distinction (BLEU)", f"intra {_num(bleu['intra'])} · stage {_num(bleu['stage'])} · "
                     f"inter {_num(bleu['inter'])}"])
        a = report["anti_induction"]["models"][model]
        rows.append([model, "anti-induction", f"corrected {_pct(a['corrected_false_premises'])} · cannot-know "
                     f"{_pct(a['cannot_know_after_stage'])} · not there {_pct(a.get('not_there_long_before'))} · "
                     f"own past {_pct(a.get('recalls_own_past'))} · earlier stage kept "
                     f"{_pct(a.get('earlier_stage_kept'))} · identity breaks {_pct(a['identity_break'])}"])
        rows.append([model, "Big Five", _big_five(report, model)])
        rows.append([model, "precision", _precision(report, model)])
        ranking = report["ranking"]
        if not ranking.get("unavailable"):
            entry = ranking["models"][model]
            rank = f"#{entry['rank']}" if entry["rank"] is not None else "unranked (every verdict missing)"
            rows.append([model, "ranking", f"{rank} (win rate {_num(entry['win_rate'])})"])
        interview = _interview(report, model)
        if interview:
            rows.append([model, "interview (1-7)", interview])
    for pair in report["probes"].get("paired", []):
        rows.append([f"{pair['b']} vs {pair['a']}", "paired probes", paired_text(pair)])
    return rows


def _ci(value: dict[str, Any] | None) -> str:
    """A rate's 95% interval in percent, '[12%, 40%]'."""
    if not value or value.get("low") is None:
        return ""
    return f"[{100 * value['low']:.0f}%, {100 * value['high']:.0f}%]"


def paired_text(pair: dict[str, Any]) -> str:
    """'+23 points [+5, +40], McNemar p=0.01 (n=30)': one paired comparison of pass rates."""
    d = pair["difference"]
    if d.get("mean") is None:
        return "no shared probes"
    return (f"{100 * d['mean']:+.0f} points [{100 * d['low']:+.0f}, {100 * d['high']:+.0f}], McNemar p="
            f"{pair['p_value']:.2g} (n={pair['n']}, {pair['only_b']} only {pair['b']}, {pair['only_a']} only "
            f"{pair['a']})")


def _interview(report: dict[str, Any], model: str) -> str | None:
    """Each rubric dimension's mean, or why there are none; None when no interview file was given."""
    section = report.get("interview") or {}
    if not section.get("enabled"):
        return None if not section.get("file") else f"unavailable: {section.get('reason')}"
    dims = section["models"][model]["dimensions"]
    parts = [f"{d} {_num(v)}" + (f" ({v['missing']} missing)" if v.get("missing") else "") for d, v in dims.items()]
    return " · ".join(parts) or "no answer could be judged"


def _big_five(report: dict[str, Any], model: str) -> str:
    section = report["ipip"]
    if not section.get("enabled"):
        return "not run"
    entry = section["models"][model]
    parts = []
    for stage, scores in entry["stages"].items():
        if all(scores["domain_mean"][d] is None for d in ipip.DOMAINS):
            parts.append(f"{stage}: no answer could be read ({scores['missing']} missing)")
            continue
        means = " ".join(f"{d}{_num(scores['domain_mean'][d], 1)}" for d in ipip.DOMAINS)
        distance = entry["target_distance"].get(stage)
        accuracy = (entry.get("dimension_accuracy") or {}).get(stage) or {}
        notes = ([f"target d={distance:.2f}"] if distance is not None else []) + (
            [f"dimension accuracy {accuracy['hits']}/{accuracy['n']}"] if accuracy.get("n") else [])
        parts.append(f"{stage}: {means}" + (f" ({', '.join(notes)})" if notes else ""))
    return "; ".join(parts)


def _precision(report: dict[str, Any], model: str) -> str:
    p = report["precision"]
    acc = p["accuracy"].get("models", {}).get(model, {})
    judge = "judge n/a" if not acc else "judge " + " · ".join(
        f"{k} {_num(v)}" + ("/5" if v.get("mean") is not None else f" ({v.get('missing', 0)} missing)")
        for k, v in acc.items())
    ppl = p["perplexity"][model]
    return (f"{judge} · ROUGE-L {_num(p['rouge_l'][model]['overall'])} · perplexity "
            f"{_num(ppl.get('overall'))}")


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
    probes = " / ".join(f"{m} {_pct({'mean': v['probe_pass']})}"
                        + (f" {_ci({'low': v.get('probe_low'), 'high': v.get('probe_high')})}"
                           if v.get("probe_low") is not None else "") for m, v in per.items())
    n = next((v.get("probe_n") for v in per.values() if v.get("probe_n")), None)
    ppl = " / ".join(f"{m} {_num(v['perplexity'], 1)}" for m, v in per.items())
    judge = stats.get("judge") or "none"
    paired = "; ".join(f"{p['b']} vs {p['a']} {paired_text(p)}" for p in stats.get("paired", []))
    return (f"probes{f' (n={n})' if n else ''} {probes}" + (f"; {paired}" if paired else "")
            + f"; perplexity {ppl}; judge {judge}" + (" (unreliable)" if stats.get("judge_reliable") is False else ""))
