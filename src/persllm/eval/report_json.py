"""report.json: what was run, and each criterion's section made from its typed record (the JSON edge)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Any

from persllm import __version__
from persllm.config import Project
from persllm.eval.criteria import CRITERIA, probes
from persllm.eval.criteria.base import Embed, Inputs
from persllm.eval.generate import ModelUnderTest
from persllm.eval.judge import UNRELIABLE, Judges, verdict_summary
from persllm.eval.runner import ModelRun, Persona, Plan


def build_report(project: Project, models: Sequence[ModelUnderTest], runs: dict[str, ModelRun], plan: Plan,
                 peers: Sequence[Persona], peer_notes: list[str], inter_notes: dict[str, list[str]], judges: Judges,
                 verdicts: dict[str, Any], embed: Embed | None, embed_note: str | None) -> dict[str, Any]:
    """What was run (models, seeds, data sizes, the judge), then every criterion's section, made from its record."""
    stage_ids = [s.id for s in project.stages]
    names = tuple(m.name for m in models)
    inputs = Inputs(project, names, runs, plan, tuple(peers), tuple(peer_notes), inter_notes, judges, verdicts, embed,
                    embed_note, probes.model_scores(project, runs, plan, names, verdicts))
    return {
        "persona": project.name, "slug": project.slug, "language": project.language, "preset": project.preset,
        "persllm_version": __version__, "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "stage_ids": stage_ids, "stages": [{"id": s.id, "label": s.label} for s in project.stages],
        "models": [{"name": m.name, "spec": m.spec, "local": m.local, "seconds": round(runs[m.name].seconds, 1),
                    "prompting": runs[m.name].prompting or _prompting(m),
                    "repetition": runs[m.name].repetition} for m in models],
        "seeds": _seeds(project, models),
        "decoding": {"max_new_tokens": plan.decoding.max_tokens, "think": project.eval.think,
                     "forced_prefix": plan.decoding.prefix},
        "data": {"heldout_questions": len(plan.heldout),
                 "heldout_by_stage": {s: sum(1 for x in plan.heldout if x.stage == s) for s in stage_ids},
                 "probes": len(plan.probes), "heldout_words": len(plan.words),
                 "probe_sources": _probe_sources(project, plan)},
        "judge": _judge_info(project, judges),
        **{c.key: c.score(inputs).to_json() for c in CRITERIA},
    }


def _prompting(model: ModelUnderTest) -> str:
    """How a model was prompted when it went through the chat template."""
    if model.name in ("sft", "dpo"):
        return "chat template with the persona system prompt (the training format)"
    return "chat template with the persona system prompt" + (" and retrieved material" if model.rag else "")


def _seeds(project: Project, models: Sequence[ModelUnderTest]) -> dict[str, Any]:
    seed = project.seed
    note = ("Local models draw both samples as rows of one seeded batch; other backends use seed "
            f"{seed} for the first sample and {seed + 1} for the second.")
    return {"project": seed, "greedy": {"temperature": 0.0, "seed": seed},
            "sampled": {"temperature": project.eval.temperature, "seeds": [seed, seed + 1], "note": note}}


def _probe_sources(project: Project, plan: Plan) -> str:
    generated = len(plan.probes) - plan.user_probes
    return f"{generated} generated from the held-out split" + (
        f", {plan.user_probes} from {project.eval.probes}" if project.eval.probes else "")


def _judge_info(project: Project, judges: Judges) -> dict[str, Any]:
    if judges.judge is None:
        return {"enabled": False, "model": None, "reason": judges.reason, "reliable": None}
    spec = project.judge or project.teacher
    reliable = spec.backend != "default"
    info = {"enabled": True, **judges.judge.describe(), "reliable": reliable,
            "note": None if reliable else UNRELIABLE,
            "verdicts": verdict_summary(judges.judge.records)}
    if isinstance(info["reported_model"], list):  # one spec, several models behind it: the verdicts are mixed
        info["reported_model_warning"] = (f"the judge endpoint reported {len(info['reported_model'])} different "
                                          f"model ids ({', '.join(info['reported_model'])}); its verdicts mix "
                                          "models and are not comparable with another run's")
    if judges.teacher is not None:
        info["target_model"] = judges.teacher.spec
    return info
