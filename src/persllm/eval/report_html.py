"""report.html: one self-contained page (inline CSS and SVG, no scripts) rendered from report.json's data."""

from __future__ import annotations

from html import escape
from typing import Any

from persllm.eval import charts
from persllm.eval.criteria import CRITERIA
from persllm.eval.render import table_html

SECTIONS = (("setup", "Setup"), *((c.anchor, c.title) for c in CRITERIA))
"""Every section's id and heading, in page order: the setup, then the criteria."""

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
            (f"<p class='note'>persllm {escape(report['persllm_version'])} · {escape(report['created'])} · preset "
             f"{escape(report['preset'])} · models: {escape(', '.join(models))}</p>"),
            "<nav>" + "".join(f"<a href='#{k}'>{escape(v)}</a>" for k, v in SECTIONS) + "</nav>",
            _setup(report), *(_section(c.anchor, c.title, c.html(report, models, palette)) for c in CRITERIA)]
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
            f"<title>persllm eval: {escape(report['persona'])}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def _section(key: str, title: str, *parts: str) -> str:
    return f"<section id='{key}'><h2>{escape(title)}</h2>" + "".join(parts) + "</section>"


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
    return _section("setup", "Setup", _smoke(r), table_html(["model", "what", "prompting", "decoding", "time"], rows), judge_html, seed_html,
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
