"""report.json's content: every criterion's numbers per model, assembled from the runs and the judge's verdicts."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Any

from persllm import __version__, template
from persllm.config import Project
from persllm.eval import criteria, ipip, judging
from persllm.eval.criteria import Embed
from persllm.eval.generate import ModelUnderTest
from persllm.eval.interview import interview_report
from persllm.eval.judging import Judges
from persllm.eval.runner import ModelRun, Persona, Plan
from persllm.prompts import load_prompts


def build_report(project: Project, models: Sequence[ModelUnderTest], runs: dict[str, ModelRun], plan: Plan,
                 peers: Sequence[Persona], peer_notes: list[str], inter_notes: dict[str, list[str]], judges: Judges,
                 verdicts: dict[str, Any], embed: Embed | None, embed_note: str | None) -> dict[str, Any]:
    """Every criterion for every model, plus what was run: models, seeds, data sizes and the judge."""
    stage_ids = [s.id for s in project.stages]
    names = [m.name for m in models]
    peer_slugs = [p.slug for p in peers]
    prompts = {s.id: (template.system_prompt(template.context_for(project, s.id)), s.description.strip())
               for s in project.stages}
    probe_scores = {m: criteria.probe_scores(runs[m].answers, plan.probes, prompts) for m in names}
    leaks = criteria.analysis_phrases(load_prompts(project.language).get("grounded.analysis"), project.name)
    for m in names:
        judged = [o for o in verdicts.get("probe", []) if o.task.model == m]
        probe_scores[m]["judge"] = criteria.judged(judged, lambda o: o.task.meta["kind"])
    distinction = {m: criteria.distinction(runs[m].answers, plan.heldout, peer_slugs, embed) for m in names}
    for m in names:
        distinction[m]["inter_notes"] = peer_notes + inter_notes[m]
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
        "distinction": {"metric": "Symmetric sentence BLEU (0-100) on language-aware tokens between sampled answers: "
                                  "intra = two samples, same persona and stage (consistency, higher is more "
                                  "consistent); stage = same question at another stage (development); inter = the same"
                                  " question answered as another persona (distinction, lower is more distinct).",
                        "models": distinction, "embedding_note": embed_note},
        "probes": {"paired": criteria.paired_probes(probe_scores, names),
                   "by_stage": {s: sum(1 for p in plan.probes if p.stage == s) for s in stage_ids},
                   "rule": "pass = not garbage (empty, repeating itself, echoing the question or the system prompt, a "
                           "generic assistant reply), one phrase of every expect_groups group, any expect_any phrase, "
                           "all expect_all phrases, no reject_any phrase, no year after reject_years_after "
                           "(case-insensitive, whole words), scored on the visible answer (no analysis)",
                   "kinds": {k: sum(1 for p in plan.probes if p.kind == k)
                             for k in sorted({p.kind for p in plan.probes})},
                   "models": probe_scores},
        "anti_induction": {"models": {m: criteria.anti_induction(probe_scores[m]) for m in names}},
        # A few-shot baseline answers in plain text: [Response] is no part of its format, stopping still is.
        "format": {"models": {m: criteria.format_failures(runs[m].answers, project.sft.keep_cot
                                                          and not runs[m].prompting, project.name,
                                                          plan.decoding.prefix, leaks) for m in names},
                   "rule": "share of greedy answers (probes and held-out questions) that leave the trained format: "
                           "no end marker within the budget, no [Response] (CoT format), analysis shown as the "
                           "answer (a visible answer opening like an analysis or carrying one of the analysis "
                           "template's sentences, or another tag after the response), or nothing visible"},
        "ipip": _ipip_report(project, runs, plan, verdicts, peers),
        "precision": {"accuracy": _accuracy(verdicts, names, judges),
                      "rouge_l": {m: criteria.rouge(runs[m].answers, plan.heldout) for m in names},
                      "perplexity": {m: runs[m].perplexity for m in names}},
        "ranking": _ranking(verdicts, names, judges),
        "interview": interview_report(project, plan, names, verdicts.get("interview") if judges.judge else None,
                                      judges.reason),
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
            "note": None if reliable else judging.UNRELIABLE,
            "verdicts": judging.verdict_summary(judges.judge.records)}
    if isinstance(info["reported_model"], list):  # one spec, several models behind it: the verdicts are mixed
        info["reported_model_warning"] = (f"the judge endpoint reported {len(info['reported_model'])} different "
                                          f"model ids ({', '.join(info['reported_model'])}); its verdicts mix "
                                          "models and are not comparable with another run's")
    if judges.teacher is not None:
        info["target_model"] = judges.teacher.spec
    return info


def _accuracy(verdicts: dict[str, Any], names: Sequence[str], judges: Judges) -> dict[str, Any]:
    if judges.judge is None:
        return {"unavailable": judges.reason}
    by_model = {m: criteria.judged([o for o in verdicts["accuracy"] if o.task.model == m],
                                   lambda o: o.task.meta["aspect"]) for m in names}
    return {"models": by_model}


def _ranking(verdicts: dict[str, Any], names: Sequence[str], judges: Judges) -> dict[str, Any]:
    if judges.judge is None:
        return {"unavailable": judges.reason}
    if len(names) < 2:
        return {"unavailable": "ranking needs at least two models"}
    return criteria.ranking(verdicts["pairwise"], names)


def _ipip_report(project: Project, runs: dict[str, ModelRun], plan: Plan, verdicts: dict[str, Any],
                 peers: Sequence[Persona]) -> dict[str, Any]:
    if not plan.ipip_stages:
        return {"enabled": False, "reason": "eval.ipip is off"}
    # Numeric domains go into the profile (distances); "high"/"low" labels only into dimension accuracy.
    targets: dict[str, dict[str, Any]] = {
        s: {"profile": {d: float(v) for d, v in p.items() if not isinstance(v, str)},
            "labels": {d: v for d, v in p.items() if isinstance(v, str)}, "source": "persona.yaml (eval.target)"}
        for s, p in project.eval.target.items() if s in plan.ipip_stages}
    for stage, derived in judging.targets_from(verdicts.get("target", [])).items():
        targets[stage] = derived | {"source": f"estimated by the teacher ({derived['repeats']} parsed repeat(s))"}
    interviews = judging.interview_scores(verdicts.get("ipip", []))
    models = {}
    for name, run in runs.items():
        stages = {s: criteria.ipip_summary(run.ipip[f"{project.slug}/{s}"], interviews.get((name, s)),
                                           project.language) for s in plan.ipip_stages}
        peer_profiles = {key.split("/")[0]: criteria.ipip_summary(admin, None, project.language)
                         for key, admin in run.ipip.items() if not key.startswith(f"{project.slug}/")}
        models[name] = {
            "stages": stages, "peers": peer_profiles,
            "target_distance": {s: _distance(stages[s]["domain_mean"], (targets.get(s) or {}).get("profile"))
                                for s in stages},
            "dimension_accuracy": {s: criteria.dimension_accuracy(stages[s]["domain_mean"], _sides(targets.get(s)))
                                   for s in stages if targets.get(s)},
            "stage_distance": {f"{a} vs {b}": _distance(stages[a]["domain_mean"], stages[b]["domain_mean"])
                               for i, a in enumerate(stages) for b in list(stages)[i + 1:]},
            "persona_distance": {slug: _distance(stages[plan.ipip_stages[-1]]["domain_mean"], p["domain_mean"])
                                 for slug, p in peer_profiles.items()},
            "interview_distance": {s: _distance(v["interview"]["domain_mean"], v["domain_mean"])
                                   for s, v in stages.items() if "interview" in v},
        }
    method = ("Choice: for local models, the log-likelihood of the options 1-5 after the answer prefix, from one "
              "batched pass over all 120 items, with contextual calibration (each option's mean log-probability "
              "over the items is subtracted before taking the best, so a model's preference for one label does not "
              "decide its profile; the uncalibrated answer counts are shown too); for other backends, a generated "
              "digit. "
              "Interview: an open question per item, rated 1-5 by the judge. Minus-keyed items are reversed "
              "(6 - answer); domains sum 24 items (24-120), facets 4 (4-20); profiles compare domain means (1-5). "
              "Dimension accuracy (InCharacter): the share of target domains whose measured mean lies on the "
              "target's side of 3 (a label high/low, or a number above/below 3), with a Wilson interval; a measured "
              "3 is a miss and a numeric target of exactly 3 is not counted.")
    return {"enabled": True, "inventory": "IPIP-NEO-120", "stages": plan.ipip_stages, "method": method,
            "targets": targets, "models": models, "interview_items": len(plan.interview)}


def _sides(target: dict[str, Any] | None) -> dict[str, float | str]:
    """A stage target's numeric domains and labels together (what dimension accuracy compares against)."""
    return {**((target or {}).get("profile") or {}), **((target or {}).get("labels") or {})}


def _distance(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b:
        return None
    d = ipip.distance(a, b)
    return None if d is None else round(d, 3)
