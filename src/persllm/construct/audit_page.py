"""audit.html: a self-contained page (inline CSS, no scripts) for reading what construct built and where it came from.

It shows the counts by stage, kind and split, the audit figures and the drop and rejection reasons from stats.json,
then a seeded random handful of samples per stage and kind with the origin of every part, the extras of their
metadata and the seed passage they were built from (file and line). The same row builders feed the CLI summary.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from persllm.config import Project
from persllm.types import NEGATIVE_TYPES, QUESTION_KINDS, Negative, Passage, Sample, stable_id
from persllm.workspace import write_text

KINDS: tuple[str, ...] = (*QUESTION_KINDS, "general")
NA = "n/a"
AUDIT_KEYS: dict[str, str] = {  # the figures construct records, in display order, with what each one means
    "responses": "responses checked",
    "shared_sentence_share": "responses containing a sentence found in 3+ other responses",
    "low_relevance_share": "responses whose relevance to their question is under the threshold",
    "relevance_threshold": "relevance threshold",
    "rewrite_grammar_errors": "first-person rewrites with a grammar error",
    "held_out_leaks": "training items that contain held-out persona words",
}
META_HIDDEN = frozenset({"origin", "mode", "prompt_version"})  # shown elsewhere or the same for every sample
META_FIRST = ("stance", "premise", "view")
ORIGIN_CLASSES: dict[str, str] = {"teacher": "teacher", "template": "rule", "material": "material",
                                  "verbatim": "material", "style": "material", "grounded": "rule"}
LEGEND = (("teacher", "the teacher LLM wrote it"), ("rule", "a template or rule built it"),
          ("material", "the persona's own words, taken from the material"))

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1080px;padding:16px 24px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin-top:24px}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;
padding:3px 8px;text-align:left;vertical-align:top}th{background:#f5f5f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}.note{color:#555;font-size:13px}nav a{margin-right:12px}
.sample{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:10px 0}
.sample dl{display:grid;grid-template-columns:80px 1fr;gap:4px 10px;margin:6px 0}
.sample dt{font-weight:600;color:#555}.sample dd{margin:0;white-space:pre-wrap}
.labels{display:flex;flex-wrap:wrap;gap:4px;align-items:center}.id{font:12px monospace;color:#777}
.lbl{font-size:12px;border-radius:3px;padding:0 6px;border:1px solid #ccc;background:#f5f5f5}
.lbl.teacher{background:#e8f0fe;border-color:#8ab4f8}.lbl.rule{background:#fef7e0;border-color:#f0c050}
.lbl.material{background:#e6f4ea;border-color:#81c995}.lbl.split{background:#fff;font-weight:600}
.lbl.extra{background:#f3e8fd;border-color:#c58af9}
.seed{background:#f7f7f7;border-left:4px solid #bbb;padding:4px 10px;margin:6px 0;font-size:13px;white-space:pre-wrap}
details{margin:6px 0;font-size:13px}summary{cursor:pointer;color:#555}
"""


def group_key(sample: Sample) -> tuple[str, str]:
    """The (stage, kind) group a sample belongs to."""
    return sample.stage, sample.kind


def ordered_groups(project: Project, samples: Sequence[Sample]) -> list[tuple[str, str]]:
    """Every (stage, kind) that has samples: project stage order, then kind order; unknown ones last."""
    present = {group_key(s) for s in samples}
    stages = [s.id for s in project.stages] + sorted({st for st, _ in present} - {s.id for s in project.stages})
    kinds = list(KINDS) + sorted({k for _, k in present} - set(KINDS))
    return [(st, k) for st in stages for k in kinds if (st, k) in present]


def pick_samples(project: Project, samples: Sequence[Sample], per_group: int) -> dict[tuple[str, str], list[Sample]]:
    """Up to `per_group` samples per (stage, kind), drawn with the project seed (same run, same choice)."""
    groups: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[group_key(sample)].append(sample)
    picked = {}
    for key in ordered_groups(project, samples):
        members = sorted(groups[key], key=lambda s: s.id)
        rng = random.Random(stable_id(project.seed, *key, "audit"))
        chosen = rng.sample(members, k=min(max(per_group, 0), len(members)))
        picked[key] = sorted(chosen, key=lambda s: s.id)
    return picked


def count_rows(project: Project, samples: Sequence[Sample]) -> list[list[str]]:
    """[stage, kind, train, test, total] per (stage, kind), then an 'all' row."""
    counts: Counter[tuple[str, str, str]] = Counter((s.stage, s.kind, s.split) for s in samples)
    rows = []
    for stage, kind in ordered_groups(project, samples):
        train, test = counts[(stage, kind, "train")], counts[(stage, kind, "test")]
        total = sum(n for (st, k, _), n in counts.items() if (st, k) == (stage, kind))
        rows.append([stage, kind, str(train), str(test), str(total)])
    by_split = Counter(s.split for s in samples)
    rows.append(["all", "all", str(by_split["train"]), str(by_split["test"]), str(len(samples))])
    return rows


def reason_rows(stats: Mapping[str, Any], key: str) -> list[list[str]] | None:
    """[reason, count] for stats[key] ('dropped' or 'rejected'), most frequent first; None when not recorded."""
    reasons = stats.get(key)
    if not isinstance(reasons, Mapping):
        return None
    ordered = sorted(reasons.items(), key=lambda kv: (-_number(kv[1]), str(kv[0])))
    return [[str(reason), str(count)] for reason, count in ordered]


def audit_rows(stats: Mapping[str, Any]) -> list[list[str]]:
    """[figure, value, meaning] for the known audit figures (n/a when missing) and every other key recorded."""
    audit = stats.get("audit")
    audit = audit if isinstance(audit, Mapping) else {}
    keys = list(AUDIT_KEYS) + [k for k in audit if k not in AUDIT_KEYS]
    return [[key, format_figure(key, audit.get(key)), AUDIT_KEYS.get(key, "")] for key in keys]


def format_figure(key: str, value: Any) -> str:
    """A figure as text: shares as percentages, other floats with 3 digits, n/a when missing."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if key.endswith("_share") else f"{value:.3g}"
    if isinstance(value, int):
        return f"{100 * value:.1f}%" if key.endswith("_share") else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def origin_class(value: Any) -> str:
    """CSS class of an origin value: teacher, rule (template, rule_*) or material (the persona's words)."""
    text = str(value)
    if text in ORIGIN_CLASSES:
        return ORIGIN_CLASSES[text]
    if text.startswith("teacher"):
        return "teacher"
    if text.startswith(("rule", "template")):
        return "rule"
    return "other"


def meta_extras(sample: Sample) -> list[tuple[str, str]]:
    """(key, value) of the sample's metadata beyond its origin, stance/premise/view first."""
    keys = [k for k in META_FIRST if k in sample.meta]
    keys += sorted(k for k in sample.meta if k not in META_HIDDEN and k not in keys)
    return [(k, _text(sample.meta[k])) for k in keys if sample.meta[k] not in (None, "")]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def render_audit_page(project: Project, samples: Sequence[Sample], negatives: Sequence[Negative],
                      passages: Sequence[Passage], stats: Mapping[str, Any], per_group: int = 5) -> str:
    """The whole page as HTML."""
    picked = pick_samples(project, samples, per_group)
    groups = Counter(group_key(s) for s in samples)
    by_passage = {p.id: p for p in passages}
    by_sample = _one_negative_each(negatives)
    mode = str(stats.get("mode") or NA)
    teacher = str(stats.get("teacher") or project.teacher.spec)
    body = [f"<h1>Data audit of {escape(project.name)}</h1>",
            (f"<p class='note'>mode <b>{escape(mode)}</b> · teacher <b>{escape(teacher)}</b> · preset "
             f"{escape(project.preset)} · {len(samples)} samples · {len(negatives)} DPO negatives · seed "
             f"{project.seed}</p>"),
            ("<nav><a href='#counts'>Counts</a><a href='#audit'>Audit figures</a><a href='#dropped'>Dropped</a>"
             "<a href='#rejected'>Rejected</a><a href='#samples'>Samples</a></nav>"),
            _section("counts", "Counts by stage, kind and split",
                     _table(["stage", "kind", "train", "test", "total"], count_rows(project, samples))),
            _section("audit", "Audit figures",
                     _table(["figure", "value", "meaning"], audit_rows(stats)) + _audit_note(stats)),
            _section("dropped", "Dropped slots (no sample was built)", _reasons(stats, "dropped")),
            _section("rejected", "Rejected teacher outputs", _reasons(stats, "rejected")),
            _section("samples", f"Samples ({per_group} at random per stage and kind)", _group_nav(list(picked)),
                     _legend(),
                     "".join(_group(key, members, groups[key], by_passage, by_sample)
                             for key, members in picked.items()))]
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
            f"<title>persllm audit: {escape(project.name)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def write_audit_page(project: Project, samples: Sequence[Sample], negatives: Sequence[Negative],
                     passages: Sequence[Passage], stats: Mapping[str, Any], path: Path, per_group: int = 5) -> Path:
    """Render the page and write it atomically to `path`; return the path."""
    write_text(path, render_audit_page(project, samples, negatives, passages, stats, per_group))
    return Path(path)


def _one_negative_each(negatives: Sequence[Negative]) -> dict[str, Negative]:
    """One negative per sample id, the first in NEGATIVE_TYPES order."""
    rank = {t: i for i, t in enumerate(NEGATIVE_TYPES)}
    out: dict[str, Negative] = {}
    for neg in sorted(negatives, key=lambda n: (rank.get(n.type, len(rank)), n.type, n.id)):
        out.setdefault(neg.sample_id, neg)
    return out


def _section(key: str, title: str, *parts: str) -> str:
    return f"<section id='{escape(key)}'><h2>{escape(title)}</h2>" + "".join(parts) + "</section>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: str) -> str:
    numeric = value.replace(".", "", 1).rstrip("%").isdigit() or value == NA
    return f"<td class='num'>{escape(value)}</td>" if numeric else f"<td>{escape(value)}</td>"


def _audit_note(stats: Mapping[str, Any]) -> str:
    if isinstance(stats.get("audit"), Mapping):
        return ""
    return ("<p class='note'>This construct run recorded no audit figures (an older persllm); "
            "re-run <code>persllm construct PROJECT --force</code> to compute them.</p>")


def _reasons(stats: Mapping[str, Any], key: str) -> str:
    rows = reason_rows(stats, key)
    if rows is None:
        return f"<p class='note'>{NA}: this construct run did not record them.</p>"
    if not rows:
        return "<p class='note'>none</p>"
    total = sum(_number(stats[key][k]) for k in stats[key])
    return _table(["reason", "count"], rows) + f"<p class='note'>total {total:g}</p>"


def _legend() -> str:
    labels = " · ".join(f"<span class='lbl {c}'>{escape(c)}</span> {escape(text)}" for c, text in LEGEND)
    return (f"<p class='note labels'>Labels read part: origin, colored by who wrote the part: {labels} · "
            "<span class='lbl extra'>extra</span> the sample's other metadata.</p>")


def _group_nav(keys: Sequence[tuple[str, str]]) -> str:
    links = "".join(f"<a href='#g-{escape(st)}-{escape(k)}'>{escape(st)} · {escape(k)}</a>" for st, k in keys)
    return f"<nav>{links}</nav>"


def _group(key: tuple[str, str], members: Sequence[Sample], total: int, by_passage: Mapping[str, Passage],
           by_sample: Mapping[str, Negative]) -> str:
    stage, kind = key
    head = (f"<h3 id='g-{escape(stage)}-{escape(kind)}'>{escape(stage)} · {escape(kind)} "
            f"<span class='note'>({len(members)} of {total} shown)</span></h3>")
    return head + "".join(_card(s, by_passage, by_sample.get(s.id)) for s in members)


def _card(sample: Sample, by_passage: Mapping[str, Passage], negative: Negative | None) -> str:
    origin = sample.meta.get("origin")
    origin = origin if isinstance(origin, Mapping) else {}
    labels = [f"<span class='lbl split'>{escape(sample.split or 'no split')}</span>"]
    labels += [f"<span class='lbl {origin_class(v)}' title='origin of the {escape(str(k))}'>"
               f"{escape(str(k))}: {escape(str(v))}</span>" for k, v in origin.items()]
    labels += [f"<span class='lbl extra'>{escape(k)}: {escape(v)}{_where(by_passage.get(v))}</span>"
               for k, v in meta_extras(sample)]
    labels.append(f"<span class='id'>{escape(sample.id)}</span>")
    fields = "".join(f"<dt>{name}</dt><dd>{escape(text) if text.strip() else '<i>(empty)</i>'}</dd>"
                     for name, text in (("Question", sample.question), ("Analysis", sample.analysis),
                                        ("Response", sample.response)))
    return (f"<article class='sample'><div class='labels'>{''.join(labels)}</div><dl>{fields}</dl>"
            + _seed(sample, by_passage) + _negative(negative) + "</article>")


def _seed(sample: Sample, by_passage: Mapping[str, Passage]) -> str:
    if not sample.seed_id:
        n = len(sample.context_ids)
        return f"<p class='note'>No seed passage (general instruction; {n} style passage(s) as context).</p>"
    passage = by_passage.get(sample.seed_id)
    if passage is None:
        return f"<p class='note'>Seed passage {escape(sample.seed_id)} not found in ingest/passages.jsonl.</p>"
    where = f"{passage.source}:{passage.line}" + (f" (part {passage.part + 1})" if passage.part else "")
    return (f"<div class='seed'><b>Seed passage</b> <span class='note'>{escape(passage.kind)} · "
            f"{escape(where)}</span>\n{escape(passage.text)}</div>")


def _where(passage: Passage | None) -> str:
    """' (file:line)' for a metadata value that is a passage id (such as view_id), else ''."""
    return f" ({escape(passage.source)}:{passage.line})" if passage is not None else ""


def _negative(negative: Negative | None) -> str:
    if negative is None:
        return ""
    return (f"<details><summary>DPO negative: {escape(negative.type)}</summary>"
            f"<div class='seed'>{escape(negative.response)}</div></details>")
