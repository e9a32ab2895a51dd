"""Distinction, consistency and development: BLEU (and embedding) similarity of sampled answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from persllm.eval.criteria.base import Criterion, Embed, Inputs, by_key
from persllm.eval.generate import Answer
from persllm.eval.metrics import mean_ci, symmetric_bleu
from persllm.eval.render import bars_html, num, table_html
from persllm.similarity import cosine
from persllm.types import Sample


def distinction(answers: Sequence[Answer], heldout: Sequence[Sample], peer_slugs: Sequence[str],
                embed: Embed | None = None) -> dict[str, Any]:
    """The paper's intra (same stage, two samples), stage (other stage) and inter (other personas) BLEU, per stage."""
    index = by_key(answers)
    pairs: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for s in heldout:
        first, second = index.get(f"sample/{s.id}/{s.stage}/1"), index.get(f"sample/{s.id}/{s.stage}/2")
        if first is None:
            continue
        slot = pairs.setdefault(s.stage, {"intra": [], "stage": [], "inter": []})
        if second is not None:
            slot["intra"].append((first.visible, second.visible))
        slot["stage"] += [(first.visible, a.visible) for k, a in index.items()
                          if k.startswith(f"other_stage/{s.id}/")]
        slot["inter"] += [(first.visible, index[f"peer/{s.id}/{p}"].visible) for p in peer_slugs
                          if f"peer/{s.id}/{p}" in index]
    out = {"bleu": _summarise(pairs, symmetric_bleu, (0.0, 100.0))}
    if embed is not None:
        texts = sorted({t for slot in pairs.values() for ps in slot.values() for pair in ps for t in pair})
        vectors = dict(zip(texts, embed(texts))) if texts else {}
        out["embedding"] = _summarise(pairs, lambda a, b: cosine(vectors[a], vectors[b]), (-1.0, 1.0))
    return out


def _summarise(pairs: dict[str, dict[str, list[tuple[str, str]]]], measure: Callable[[str, str], float],
               bounds: tuple[float, float]) -> dict[str, Any]:
    scores = {stage: {k: [measure(a, b) for a, b in ps] for k, ps in slot.items()} for stage, slot in pairs.items()}
    by_stage = {stage: {k: mean_ci(values, bounds).as_dict() for k, values in slot.items()}
                for stage, slot in scores.items()}
    overall = {k: mean_ci([v for slot in scores.values() for v in slot[k]], bounds).as_dict()
               for k in ("intra", "stage", "inter")}
    return {"by_stage": by_stage, "overall": overall}


METRIC = ("Symmetric sentence BLEU (0-100) on language-aware tokens between sampled answers: intra = two samples, "
          "same persona and stage (consistency, higher is more consistent); stage = same question at another stage "
          "(development); inter = the same question answered as another persona (distinction, lower is more "
          "distinct).")


@dataclass(frozen=True)
class DistinctionResult:
    """Per model: BLEU (and embedding) intra/stage/inter by stage and overall, and why inter may be missing."""

    models: dict[str, dict[str, Any]]
    embedding_note: str | None

    def to_json(self) -> dict[str, Any]:
        """report.json's "distinction" section."""
        return {"metric": METRIC, "models": self.models, "embedding_note": self.embedding_note}


def score(inputs: Inputs) -> DistinctionResult:
    """Every model's distinction scores, with the notes on peers that could not be played."""
    peer_slugs = [p.slug for p in inputs.peers]
    models = {m: distinction(inputs.runs[m].answers, inputs.plan.heldout, peer_slugs, inputs.embed)
              for m in inputs.names}
    for m in inputs.names:
        models[m]["inter_notes"] = list(inputs.peer_notes) + inputs.inter_notes[m]
    return DistinctionResult(models, inputs.embed_note)


def summary(report: dict[str, Any], model: str) -> list[list[str]]:
    """The terminal row: overall intra, stage and inter BLEU."""
    bleu = report["distinction"]["models"][model]["bleu"]["overall"]
    return [[model, "distinction (BLEU)", (f"intra {num(bleu['intra'])} · stage {num(bleu['stage'])} · "
             f"inter {num(bleu['inter'])}")]]


def html(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    """The distinction section: BLEU (and embedding) intra, stage and inter per model and stage."""
    d = r["distinction"]
    parts = [f"<p class='note'>{escape(d['metric'])}</p>"]
    rows = []
    for m in models:
        bleu = d["models"][m]["bleu"]
        for stage, values in bleu["by_stage"].items():
            rows.append([m, stage, values["intra"], values["stage"], values["inter"]])
        rows.append([m, "all", bleu["overall"]["intra"], bleu["overall"]["stage"], bleu["overall"]["inter"]])
    parts.append(table_html(["model", "stage", "intra (consistency, higher)", "stage (development)",
                         "inter (distinction, lower)"], rows))
    table = {m: [d["models"][m]["bleu"]["overall"][k] for k in ("intra", "stage", "inter")] for m in models}
    parts.append(bars_html("BLEU by measure", ["intra", "stage", "inter"], table, palette))
    notes = [f"{m}: {n}" for m in models for n in d["models"][m].get("inter_notes", [])]
    if notes:
        parts.append("<p class='note'>Inter unavailable: " + escape("; ".join(notes)) + "</p>")
    if d.get("embedding_note"):
        parts.append(f"<p class='note'>Embedding variant: {escape(d['embedding_note'])}</p>")
    else:
        emb = {m: [d["models"][m]["embedding"]["overall"][k] for k in ("intra", "stage", "inter")] for m in models}
        parts.append(bars_html("Embedding cosine by measure", ["intra", "stage", "inter"], emb, palette, ymax=1.0))
    return "".join(parts)


CRITERION = Criterion("distinction", "distinction", "Distinction, consistency and development", score, summary, html)
