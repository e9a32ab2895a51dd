"""report.html: one self-contained page (inline CSS and SVG, no scripts) rendered from report.json's data."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from persllm.eval import charts, ipip

SECTIONS = (("setup", "Setup"), ("distinction", "Distinction, consistency and development"),
            ("probes", "Probes"), ("format", "Answer format"), ("anti-induction", "Anti-induction and temporal boundary"),
            ("big-five", "Psychological scale (IPIP-NEO-120)"), ("precision", "Precision against golden answers"),
            ("ranking", "Ranking by the judge"), ("interview", "Interview (Character-LLM rubric)"))

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1080px;padding:16px 24px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#555;font-size:13px}.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px}
.charts{display:flex;flex-wrap:wrap;gap:12px}pre{white-space:pre-wrap;background:#f7f7f7;padding:8px;font-size:12px}
nav a{margin-right:12px}details{margin:6px 0}.fail{font-size:12px}
"""


def render_html(report: dict[str, Any]) -> str:
    """The whole page."""
    models = [m["name"] for m in report["models"]]
    palette = charts.colors(models + ["target"])
    body = [f"<h1>Evaluation of {escape(report['persona'])}</h1>",
            f"<p class='note'>persllm {escape(report['persllm_version'])} · {escape(report['created'])} · preset "
            f"{escape(report['preset'])} · models: {escape(', '.join(models))}</p>",
            "<nav>" + "".join(f"<a href='#{k}'>{escape(v)}</a>" for k, v in SECTIONS) + "</nav>",
            _setup(report), _distinction(report, models, palette), _probes(report, models, palette),
            _format(report, models, palette), _anti_induction(report, models, palette), _big_five(report, models, palette),
            _precision(report, models, palette), _ranking(report, models, palette), _interview(report, models)]
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
            f"<title>persllm eval: {escape(report['persona'])}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def _section(key: str, *parts: str) -> str:
    title = dict(SECTIONS)[key]
    return f"<section id='{key}'><h2>{escape(title)}</h2>" + "".join(parts) + "</section>"


def fmt(value: Any, digits: int = 2) -> str:
    """A number, an estimate dict (mean [low, high] n=..), or n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        if value.get("mean") is None:
            return "n/a" + (f" (n={value['n']})" if value.get("n") else "")
        text = f"{value['mean']:.{digits}f}"
        if value.get("low") is not None:
            text += f" [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"
        return text + f" n={value['n']}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, (int, float, dict)) or value is None:
        return f"<td class='num'>{escape(fmt(value))}</td>"
    return f"<td>{escape(str(value))}</td>"


def _mean(value: Any) -> float | None:
    return value.get("mean") if isinstance(value, dict) else value


def _interval(value: Any) -> tuple[float, float] | None:
    if isinstance(value, dict) and value.get("low") is not None:
        return value["low"], value["high"]
    return None


def _bars(title: str, categories: Sequence[str], table: dict[str, Sequence[Any]], palette: dict[str, str],
          ymax: float | None = None) -> str:
    series = {m: [_mean(v) for v in vs] for m, vs in table.items()}
    intervals = {m: [_interval(v) for v in vs] for m, vs in table.items()}
    return charts.bar_chart(title, categories, series, palette, intervals, ymax=ymax)


def _setup(r: dict[str, Any]) -> str:
    judge = r["judge"]
    seeds = r["seeds"]
    rows = [[m["name"], m["spec"], m.get("prompting", ""), _repetition(m.get("repetition") or {}),
             f"{m.get('seconds', 0):.0f}s"] for m in r["models"]]
    judge_html = (f"<p>Judge: <b id='judge-name'>{escape(judge.get('model') or 'none')}</b>"
                  + (f" · prompts {escape(judge['prompt_version'])} · {judge['repeats']} repeat(s), "
                     f"{judge['retries']} retries · temperature {judge['temperature']} · judge seeds "
                     f"{escape(', '.join(map(str, judge['seeds'])))}" if judge.get("enabled") else
                     f" ({escape(judge.get('reason', 'disabled'))})") + "</p>")
    if judge.get("enabled"):
        reported = judge.get("reported_model")
        shown = ", ".join(reported) if isinstance(reported, list) else reported or "none (the backend reports no id)"
        judge_html += f"<p class='note'>Model id reported by the judge: <b id='judge-reported'>{escape(shown)}</b></p>"
    for key in ("reported_model_warning", "note"):
        if judge.get(key):
            judge_html += f"<p class='warn'>{escape(judge[key])}</p>"
    if judge.get("enabled"):
        counts = judge.get("verdicts", {})
        parts = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "replies")
        judge_html += (f"<p class='note'>Judge replies: {counts.get('replies', 0)} ({escape(parts or 'none')}); "
                       f"a reply that does not parse is asked again up to {judge['retries']} time(s), then counted as "
                       "missing, never as a score.</p>")
        judge_html += "".join(f"<details><summary>Judge prompt: {escape(k)}</summary><pre>{escape(v)}</pre></details>"
                              for k, v in judge.get("prompts", {}).items())
    sampled = seeds["sampled"]
    seed_html = (f"<p id='seeds'>Seeds: project seed {seeds['project']}; greedy answers (probes, held-out, interview) "
                 f"at temperature 0; sampled answers at temperature {sampled['temperature']} with seeds "
                 f"{escape(', '.join(map(str, sampled['seeds'])))}. {escape(sampled['note'])}</p>")
    decoding = r["decoding"]
    if decoding["forced_prefix"]:
        seed_html += (f"<p class='note'>Local models start their answers at {escape(decoding['forced_prefix'].strip())}"
                      f" (eval.think is false), with at most {decoding['max_new_tokens']} new tokens.</p>")
    data = r["data"]
    by_stage = ", ".join(f"{k} {v}" for k, v in data["heldout_by_stage"].items())
    data_html = (f"<p>Held-out questions: {data['heldout_questions']} ({escape(by_stage)});"
                 f" probes: {data['probes']} ({escape(data['probe_sources'])}); held-out passages of the persona's own "
                 f"words: {data['heldout_words']}.</p>")
    return _section("setup", _smoke(r), _table(["model", "what", "prompting", "decoding", "time"], rows), judge_html, seed_html,
                    data_html)


def _repetition(settings: dict[str, Any]) -> str:
    """A model's anti-repetition decoding in words, e.g. 'repetition penalty 1.1, no repeated 4-grams'."""
    parts = []
    if settings.get("repetition_penalty", 1.0) != 1.0:
        parts.append(f"repetition penalty {settings['repetition_penalty']:g}")
    if settings.get("no_repeat_ngram", 0):
        parts.append(f"no repeated {settings['no_repeat_ngram']}-grams")
    return ", ".join(parts) or "plain"


def _smoke(r: dict[str, Any]) -> str:
    """A warning box when a tuned model failed its post-training generation smoke test (else one quiet line)."""
    smoke = r.get("smoke") or {}
    failed = {k: v for k, v in smoke.items() if not v.get("ok")}
    if not failed:
        return (f"<p class='note' id='smoke'>Post-training smoke tests passed: {escape(', '.join(smoke))}.</p>"
                if smoke else "")
    parts = []
    for stage, result in failed.items():
        example = result.get("example") or {}
        line = f"<p><b>{escape(stage)}</b>: {escape(', '.join(result.get('problems') or ['no answers']))}"
        if example:
            line += (f" · e.g. <i>{escape(example.get('question', ''))}</i></p>"
                     f"<pre>{escape(example.get('text', ''))}</pre>")
        else:
            line += "</p>"
        parts.append(line + f"<p class='note'>details: {escape(result.get('path', ''))}</p>")
    return ("<div class='warn' id='smoke'><p><b>Smoke test failed</b>: after training, greedy answers to training "
            "prompts did not end at the end-of-turn marker, looped, or lacked [Response]. The scores below describe "
            "a model that does not answer properly.</p>" + "".join(parts) + "</div>")


def _distinction(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    d = r["distinction"]
    parts = [f"<p class='note'>{escape(d['metric'])}</p>"]
    rows = []
    for m in models:
        bleu = d["models"][m]["bleu"]
        for stage, values in bleu["by_stage"].items():
            rows.append([m, stage, values["intra"], values["stage"], values["inter"]])
        rows.append([m, "all", bleu["overall"]["intra"], bleu["overall"]["stage"], bleu["overall"]["inter"]])
    parts.append(_table(["model", "stage", "intra (consistency, higher)", "stage (development)",
                         "inter (distinction, lower)"], rows))
    table = {m: [d["models"][m]["bleu"]["overall"][k] for k in ("intra", "stage", "inter")] for m in models}
    parts.append(_bars("BLEU by measure", ["intra", "stage", "inter"], table, palette))
    notes = [f"{m}: {n}" for m in models for n in d["models"][m].get("inter_notes", [])]
    if notes:
        parts.append("<p class='note'>Inter unavailable: " + escape("; ".join(notes)) + "</p>")
    if d.get("embedding_note"):
        parts.append(f"<p class='note'>Embedding variant: {escape(d['embedding_note'])}</p>")
    else:
        emb = {m: [d["models"][m]["embedding"]["overall"][k] for k in ("intra", "stage", "inter")] for m in models}
        parts.append(_bars("Embedding cosine by measure", ["intra", "stage", "inter"], emb, palette, ymax=1.0))
    return _section("distinction", *parts)


def _probes(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    p = r["probes"]
    kinds = sorted(p["kinds"])
    rows = [[m, p["models"][m]["overall"]] + [p["models"][m]["by_kind"].get(k) for k in kinds] for m in models]
    parts = [f"<p class='note'>{escape(p['rule'])}</p>", _table(["model", "all"] + kinds, rows),
             _bars("Probe pass rate by kind", kinds, {m: [p["models"][m]["by_kind"].get(k) for k in kinds]
                                                         for m in models}, palette, ymax=1.0)]
    if p.get("paired"):
        parts.append("<h3 id='paired'>Paired comparisons on the same probes</h3><p class='note'>Difference of pass "
                     "rates (second minus first) with Newcombe's 95% interval for paired proportions, and the "
                     "two-sided exact McNemar p on the probes only one of the two passed. An interval that "
                     "contains 0 (or p &gt;= 0.05) means the probes cannot tell the two models apart.</p>")
        parts.append(_table(["first", "second", "n", "first passes", "second passes", "difference [95% CI]",
                             "only first", "only second", "McNemar p"],
                            [[x["a"], x["b"], x["n"], x["a_rate"], x["b_rate"], x["difference"], x["only_a"],
                              x["only_b"], x["p_value"]] for x in p["paired"]]))
    judged = {m: p["models"][m].get("judge", {}) for m in models}
    if any(judged.values()):
        parts.append("<h3>Judge scores against the probe references (0-5)</h3>")
        parts.append(_table(["model"] + kinds, [[m] + [judged[m].get(k) for k in kinds] for m in models]))
    for m in models:
        failures = p["models"][m]["failures"]
        items = "".join(f"<li class='fail'><b>{escape(f['probe_id'])}</b> [{escape(f['kind'])}/{escape(f['stage'])}] "
                        f"Q: {escape(f['question'])}<br>A: {escape(f['answer'] or '(empty)')}<br>"
                        f"<i>{escape('; '.join(f['reasons']))}</i></li>" for f in failures)
        parts.append(f"<details><summary>{escape(m)}: {len(failures)} failing answer(s)</summary><ul>{items}</ul>"
                     "</details>")
    return _section("probes", *parts)


def _format(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    f = r.get("format")
    if not f:
        return _section("format", "<p class='note'>not measured</p>")
    rows = [[m, f["models"][m]["rate"], *(f["models"][m]["counts"][k] for k in
                                          ("no_stop", "no_response", "analysis_in_answer", "empty"))] for m in models]
    parts = [f"<p class='note'>{escape(f['rule'])}</p>",
             _table(["model", "answers off the format", "no stop", "no [Response]", "analysis shown", "empty"], rows),
             _bars("Answers off the trained format (lower)", ["off format"],
                   {m: [f["models"][m]["rate"]] for m in models}, palette, 1.0)]
    for m in models:
        examples = f["models"][m]["examples"]
        if examples:
            items = "".join(f"<li class='fail'>[{escape(', '.join(e['problems']))}] <pre>{escape(e['text'])}</pre></li>"
                            for e in examples)
            parts.append(f"<details><summary>{escape(m)}: examples</summary><ul>{items}</ul></details>")
    return _section("format", *parts)


def _anti_induction(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    a = r["anti_induction"]["models"]
    keys = [("corrected_false_premises", "false premises corrected (higher)", "corrected"),
            ("cannot_know_after_stage", "future: 'cannot know' after the stage (higher)", "future"),
            ("not_there_long_before", "past-absence: not there, long before (higher)", "past-absence"),
            ("recalls_own_past", "past-presence: recalls own past (higher)", "past-presence"),
            ("earlier_stage_kept", "past-only: earlier stage kept (higher)", "past-only"),
            ("identity_break", "identity breaks (lower)", "identity breaks")]
    keys = [k for k in keys if any(a[m].get(k[0]) for m in models)] or keys[:1]
    rows = [[m] + [a[m].get(k) for k, _, _ in keys] for m in models]
    table = {m: [a[m].get(k) for k, _, _ in keys] for m in models}
    return _section("anti-induction", "<p class='note'>Temporal types after TimeChara (Ahn et al., 2024): future, "
                    "past-absence, past-presence and past-only; see docs/probes.md.</p>",
                    _table(["model"] + [label for _, label, _ in keys], rows),
                    _bars("Boundary rates", [short for _, _, short in keys], table, palette, 1.0))


def _big_five(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    b = r["ipip"]
    if not b.get("enabled"):
        return _section("big-five", f"<p class='note'>{escape(b.get('reason', 'disabled'))}</p>")
    parts = [f"<p class='note'>{escape(b['method'])}</p>", "<div class='charts'>"]
    axes = [ipip.DOMAIN_NAMES[d] for d in ipip.DOMAINS]
    for stage in b["stages"]:
        series = {m: [b["models"][m]["stages"][stage]["domain_mean"][d] for d in ipip.DOMAINS] for m in models
                  if stage in b["models"][m]["stages"]}
        target = (b["targets"].get(stage) or {}).get("profile")
        if target:
            series["target"] = [target.get(d) for d in ipip.DOMAINS]
        parts.append(charts.radar_chart(f"Big Five at {stage} (1-5)", axes, series, palette, dashed=["target"]))
    parts.append("</div>")
    rows = []
    for m in models:
        for stage, s in b["models"][m]["stages"].items():
            sums = s.get("domain_sum") or {}
            rows.append([m, stage, s["method"]] + [f"{sums.get(d, 'n/a')} / {s['domain_mean'][d]:.2f}"
                                                   if s["domain_mean"][d] is not None else "n/a"
                                                   for d in ipip.DOMAINS]
                        + [b["models"][m]["target_distance"].get(stage),
                           _accuracy_cell(b["models"][m].get("dimension_accuracy", {}).get(stage)),
                           _counts(s.get("raw_option_counts"))])
    parts.append(_table(["model", "stage", "method"] + [f"{d} sum / mean" for d in ipip.DOMAINS]
                        + ["distance to target", "dimension accuracy", "uncalibrated answers 1-5"], rows))
    parts.append(_targets(b))
    parts.append(_distances(b, models))
    parts.append(_facets(b, models))
    return _section("big-five", *parts)


def _accuracy_cell(acc: dict[str, Any] | None) -> str:
    """Dimension accuracy as 'hits/n (rate [low, high])', or n/a without a labelled or numeric target."""
    if not acc or not acc.get("n"):
        return "n/a"
    return f"{acc['hits']}/{acc['n']} ({fmt(acc)})"


def _counts(counts: dict[str, int] | None) -> str:
    return " ".join(f"{k}:{v}" for k, v in counts.items()) if counts else "-"


def _targets(b: dict[str, Any]) -> str:
    rows = [[stage, t.get("source", ""), *((t.get("profile") or {}).get(d, (t.get("labels") or {}).get(d))
                                            for d in ipip.DOMAINS)]
            for stage, t in b["targets"].items()]
    return "<h3>Target profiles</h3>" + _table(["stage", "source", *ipip.DOMAINS], rows)


def _distances(b: dict[str, Any], models: list[str]) -> str:
    rows = []
    for m in models:
        entry = b["models"][m]
        rows += [[m, "between stages", k, v] for k, v in entry["stage_distance"].items()]
        rows += [[m, "to other persona", k, v] for k, v in entry["persona_distance"].items()]
        rows += [[m, "interview vs choice", k, v] for k, v in entry.get("interview_distance", {}).items()]
    if not rows:
        return ""
    return ("<h3>Profile distances (Euclidean over domain means)</h3>"
            + _table(["model", "between", "which", "distance"], rows))


def _facets(b: dict[str, Any], models: list[str]) -> str:
    header = ["facet"] + [f"{m}/{s}" for m in models for s in b["models"][m]["stages"]]
    rows = []
    for d in ipip.DOMAINS:
        for f, name in enumerate(ipip.FACET_NAMES[d], 1):
            key = f"{d}{f}"
            row: list[Any] = [f"{key} {name}"]
            for m in models:
                for s in b["models"][m]["stages"].values():
                    sums = s.get("facet_sum")
                    row.append(sums[key] if sums else s["facet_mean"][key])
            rows.append(row)
    return "<details><summary>Facet scores (sums 4-20)</summary>" + _table(header, rows) + "</details>"


def _precision(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    p = r["precision"]
    acc = p["accuracy"]
    parts = []
    if acc.get("unavailable"):
        parts.append(f"<p class='note'>Judge accuracy: {escape(acc['unavailable'])}</p>")
    else:
        rows = [[m, acc["models"].get(m, {}).get("knowledge"), acc["models"].get(m, {}).get("attitude")]
                for m in models]
        parts += ["<h3>Judge agreement with the golden answer (0-5)</h3>",
                  _table(["model", "knowledge", "attitude"], rows),
                  _bars("Judge agreement (0-5)", ["knowledge", "attitude"], {row[0]: row[1:] for row in rows},
                        palette, 5.0)]
    parts += ["<h3>ROUGE-L against the golden answer</h3>",
              _table(["model", "all"] + r["stage_ids"],
                     [[m, p["rouge_l"][m]["overall"]] + [p["rouge_l"][m]["by_stage"].get(s) for s in r["stage_ids"]]
                      for m in models])]
    ppl_rows = []
    for m in models:
        entry = p["perplexity"][m]
        if "unavailable" in entry:
            ppl_rows.append([m, "n/a", entry["unavailable"]])
        else:
            ppl_rows.append([m, entry["overall"], f"{entry['tokens']} tokens; " + ", ".join(
                f"{s}: {v['perplexity']:.2f}" for s, v in entry["by_stage"].items() if v["perplexity"] is not None)])
    parts += ["<h3>Held-out perplexity of the persona's own words (lower is better)</h3>",
              _table(["model", "perplexity", "detail"], ppl_rows)]
    bars = {m: [p["rouge_l"][m]["overall"]] for m in models}
    parts.append("<div class='charts'>" + _bars("ROUGE-L", ["ROUGE-L"], bars, palette, 1.0))
    ppl = {m: [p["perplexity"][m].get("overall")] for m in models}
    parts.append(_bars("Held-out perplexity", ["perplexity"], ppl, palette) + "</div>")
    return _section("precision", *parts)


def _ranking(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    k = r["ranking"]
    if k.get("unavailable"):
        return _section("ranking", f"<p class='note'>{escape(k['unavailable'])}</p>")
    rows = [[m, k["models"][m]["rank"], k["models"][m]["win_rate"]] for m in models]
    pairs = [[f"{p['a']} vs {p['b']}", p["a_wins"], p["b_wins"], p["ties"], p["missing"]] for p in k["pairs"]]
    return _section("ranking", "<p class='note'>Each comparison is asked in both orders; a win counts only when "
                    "both orders agree, otherwise it is a tie (position bias control).</p>",
                    _table(["model", "rank", "win rate"], rows),
                    _table(["pair", "first wins", "second wins", "ties", "missing"], pairs),
                    f"<p class='note'>Position consistency: {escape(fmt(k['position_consistency']))}</p>",
                    _bars("Win rate", ["win rate"], {m: [k["models"][m]["win_rate"]] for m in models}, palette, 1.0))


def _interview(r: dict[str, Any], models: list[str]) -> str:
    """Per model and rubric dimension: mean [95% interval] n, with missing verdicts; reports without one say so."""
    section = r.get("interview") or {"reason": "not in this report (made before interviews existed)"}
    if not section.get("enabled"):
        return _section("interview", f"<p class='note'>Unavailable: {escape(section.get('reason', 'disabled'))}</p>")
    dims = section["dimensions"]
    low, high = section["scale"]
    rows = [[m, section["models"][m]["judged_answers"]] + [section["models"][m]["dimensions"].get(d) for d in dims]
            + [sum(v.get("missing", 0) for v in section["models"][m]["dimensions"].values())] for m in models]
    parts = [f"<p class='note'>{escape(section['method'])}</p>",
             f"<p>{section['questions']} question(s) from {escape(section['file'])}, {section['answers']} answer(s) "
             f"per model; scale {low}-{high} (higher is better on every dimension).</p>",
             _table(["model", "answers judged"] + dims + ["missing verdicts"], rows).replace(
                 "<table>", "<table id='interview-table'>", 1)]
    for m in models:
        by_stage = section["models"][m]["by_stage"]
        if len(by_stage) > 1:
            parts.append(f"<details><summary>{escape(m)} by stage</summary>"
                         + _table(["stage"] + dims, [[s] + [v.get(d) for d in dims] for s, v in by_stage.items()])
                         + "</details>")
        by_topic = section["models"][m].get("by_topic") or {}
        if by_topic:
            parts.append(f"<details><summary>{escape(m)} by topic</summary>"
                         + _table(["topic"] + dims, [[t] + [v.get(d) for d in dims] for t, v in by_topic.items()])
                         + "</details>")
    return _section("interview", *parts)
