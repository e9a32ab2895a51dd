"""Precision against the golden answers: judge agreement, ROUGE-L and held-out perplexity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from persllm.config import Project
from persllm.eval.criteria.base import Criterion, Inputs, by_key, judged, stage_names
from persllm.eval.generate import Answer
from persllm.eval.judge import Judges, Task, score_parser
from persllm.eval.metrics import mean_ci, rouge_l
from persllm.eval.render import bars_html, num, table_html
from persllm.eval.runner import ModelRun
from persllm.prompts import Prompts
from persllm.types import Sample


def rouge(answers: Sequence[Answer], heldout: Sequence[Sample]) -> dict[str, Any]:
    """ROUGE-L F of the greedy answer against the golden response, per stage and overall."""
    index = by_key(answers)
    values: dict[str, list[float]] = {}
    for s in heldout:
        answer = index.get(f"heldout/{s.id}")
        if answer is not None:
            values.setdefault(s.stage, []).append(rouge_l(answer.visible, s.response))
    return {"overall": mean_ci([v for vs in values.values() for v in vs], (0.0, 1.0)).as_dict(),
            "by_stage": {k: mean_ci(v, (0.0, 1.0)).as_dict() for k, v in values.items()}}


def aspect(sample_kind: str) -> str:
    """The paper's item typing, read from the construct kind: opinions are attitude items, the rest knowledge."""
    return "attitude" if sample_kind == "opinion" else "knowledge"


def accuracy_tasks(project: Project, prompts: Prompts, runs: Sequence[ModelRun], heldout: Sequence[Sample],
                   limit: int) -> list[Task]:
    """0-5 agreement of each model's greedy answer with the golden answer (knowledge or attitude)."""
    tasks = []
    for run in runs:
        index = by_key(run.answers)
        for s in [s for s in heldout if f"heldout/{s.id}" in index][:limit]:
            kind = aspect(s.kind)
            values = stage_names(project, s.stage) | {"question": s.question, "reference": s.response,
                                                      "answer": index[f"heldout/{s.id}"].visible,
                                                      "aspect": prompts.get(f"judge.aspects.{kind}")}
            tasks.append(Task("accuracy", run.model.name, s.id, "accuracy", values, score_parser(0, 5),
                              {"aspect": kind, "stage": s.stage}))
    return tasks


def _accuracy(verdicts: dict[str, Any], names: Sequence[str], judges: Judges) -> dict[str, Any]:
    if judges.judge is None:
        return {"unavailable": judges.reason}
    by_model = {m: judged([o for o in verdicts["accuracy"] if o.task.model == m], lambda o: o.task.meta["aspect"])
                for m in names}
    return {"models": by_model}


@dataclass(frozen=True)
class PrecisionResult:
    """Per model: judge agreement with the golden answers, ROUGE-L against them, held-out perplexity."""

    accuracy: dict[str, Any]
    rouge_l: dict[str, dict[str, Any]]
    perplexity: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """report.json's "precision" section."""
        return {"accuracy": self.accuracy, "rouge_l": self.rouge_l, "perplexity": self.perplexity}


def score(inputs: Inputs) -> PrecisionResult:
    """Every model's precision against the golden answers."""
    names = inputs.names
    return PrecisionResult(_accuracy(inputs.verdicts, names, inputs.judges),
                           {m: rouge(inputs.runs[m].answers, inputs.plan.heldout) for m in names},
                           {m: inputs.runs[m].perplexity for m in names})


def summary(report: dict[str, Any], model: str) -> list[list[str]]:
    """The terminal row: judge agreement, ROUGE-L and perplexity."""
    return [[model, "precision", summary_line(report, model)]]


def summary_line(report: dict[str, Any], model: str) -> str:
    p = report["precision"]
    acc = p["accuracy"].get("models", {}).get(model, {})
    judge = "judge n/a" if not acc else "judge " + " · ".join(
        f"{k} {num(v)}" + ("/5" if v.get("mean") is not None else f" ({v.get('missing', 0)} missing)")
        for k, v in acc.items())
    ppl = p["perplexity"][model]
    return (f"{judge} · ROUGE-L {num(p['rouge_l'][model]['overall'])} · perplexity "
            f"{num(ppl.get('overall'))}")


def html(r: dict[str, Any], models: list[str], palette: dict[str, str]) -> str:
    """The precision section: judge agreement, ROUGE-L and held-out perplexity per model."""
    p = r["precision"]
    acc = p["accuracy"]
    parts = []
    if acc.get("unavailable"):
        parts.append(f"<p class='note'>Judge accuracy: {escape(acc['unavailable'])}</p>")
    else:
        rows = [[m, acc["models"].get(m, {}).get("knowledge"), acc["models"].get(m, {}).get("attitude")]
                for m in models]
        parts += ["<h3>Judge agreement with the golden answer (0-5)</h3>",
                  table_html(["model", "knowledge", "attitude"], rows),
                  bars_html("Judge agreement (0-5)", ["knowledge", "attitude"], {row[0]: row[1:] for row in rows},
                        palette, 5.0)]
    parts += ["<h3>ROUGE-L against the golden answer</h3>",
              table_html(["model", "all"] + r["stage_ids"],
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
              table_html(["model", "perplexity", "detail"], ppl_rows)]
    bars = {m: [p["rouge_l"][m]["overall"]] for m in models}
    parts.append("<div class='charts'>" + bars_html("ROUGE-L", ["ROUGE-L"], bars, palette, 1.0))
    ppl = {m: [p["perplexity"][m].get("overall")] for m in models}
    parts.append(bars_html("Held-out perplexity", ["perplexity"], ppl, palette) + "</div>")
    return "".join(parts)


CRITERION = Criterion("precision", "precision", "Precision against golden answers", score, summary, html)
