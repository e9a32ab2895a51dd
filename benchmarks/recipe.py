"""The small-model recipe, chosen by measurement: train the embedded Gemma 3 270M on the example personas under
candidate settings and score each on held-out material with persllm's own evaluation.

Per persona the data is constructed once per preset and shared by every candidate of that preset (each candidate
runs `persllm run` on a copy of it, so the probes are the same for all and every pair of candidates is compared on
the same items). A candidate is a preset plus `--set` overrides; its row gives the probe pass rates (base, SFT, DPO,
Wilson intervals), the paired difference of DPO against the prompted base and against the `demo` candidate (Newcombe
interval, McNemar p), the share of answers off the trained format, held-out perplexity of the persona's own words,
the SFT and DPO smoke tests, the trained facts the tuned models recall (benchmarks/recall.py), the DPO model's
passes per probe kind and the wall time of training plus evaluation.

    python -m benchmarks recipe                                   # every candidate on both examples (hours)
    PERSLLM_RECIPE=demo,cot python -m benchmarks recipe           # some candidates
    python -m benchmarks.recipe --candidates demo,cot --personas ada-lovelace --workdir /tmp/recipe

Results are kept in the work directory (default benchmarks/.recipe): a rerun skips finished candidates, so an
interrupted sweep resumes where it stopped; a table in Markdown is written to <workdir>/recipe.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PERSONAS = ("ada-lovelace", "lu-xun")
TRAINED = ("ingest", "construct")  # stage outputs shared by the candidates of one preset


@dataclass(frozen=True)
class Candidate:
    """One recipe: a preset and the settings that differ from it."""

    name: str
    preset: str
    overrides: tuple[str, ...]
    what: str
    reuses: str = ""  # a candidate whose trained stages this one starts from; the pipeline retrains what differs
    compare_with: str = ""  # a candidate of another preset whose DPO model is evaluated on this one's probes too
    replicates: str = ""  # the candidate this one repeats under another seed: their paired differences are pooled


# One factor at a time against the shipped `demo` preset (the same data, the same probes), plus the `cpu` preset.
CANDIDATES = (
    Candidate("demo", "demo", (), "the demo preset as shipped"),
    Candidate("cot", "demo", ("sft.keep_cot=true",), "chain of thought kept in the target ([Analysis] then [Response])"),
    Candidate("plain-decoding", "demo", ("decoding.repetition_penalty=1.0", "decoding.no_repeat_ngram=0"),
              "no repetition penalty and no n-gram ban when answering", reuses="demo"),
    Candidate("penalty-only", "demo", ("decoding.no_repeat_ngram=0",), "repetition penalty without the n-gram ban",
              reuses="demo"),
    Candidate("steps-30", "demo", ("sft.max_steps=30", "sft.save_steps=15"), "half the SFT steps"),
    Candidate("steps-120", "demo", ("sft.max_steps=120", "sft.save_steps=60"), "twice the SFT steps"),
    Candidate("steps-240", "demo", ("sft.max_steps=240", "sft.save_steps=80"),
              "four times the SFT steps (about 7.5 epochs: do more passes fit the persona's facts?)"),
    Candidate("lr-1e-4", "demo", ("sft.learning_rate=1e-4",), "half the SFT learning rate"),
    Candidate("lr-4e-4", "demo", ("sft.learning_rate=4e-4",), "twice the SFT learning rate"),
    Candidate("rank-8", "demo", ("sft.lora_r=8", "sft.lora_alpha=16"), "LoRA rank 8"),
    Candidate("rank-32", "demo", ("sft.lora_r=32", "sft.lora_alpha=64"), "LoRA rank 32"),
    Candidate("attention-only", "demo", ("sft.target_modules=q_proj,k_proj,v_proj,o_proj",),
              "LoRA on the attention projections only"),
    Candidate("length-512", "demo", ("sft.max_length=512", "dpo.max_length=512"), "longer training sequences"),
    Candidate("induced-0.2", "demo", ("construct.kinds={ordinary: 0.55, opinion: 0.25, induced: 0.2}",),
              "half the share of induced (false-premise) questions: fewer trained refusals"),
    Candidate("no-general", "demo", ("sft.general_ratio=0",), "no general conversations in SFT"),
    Candidate("general-50", "demo", ("sft.general_ratio=0.5",), "twice the share of general conversations"),
    Candidate("beta-0.3", "demo", ("dpo.beta=0.3",), "DPO beta 0.3", reuses="demo"),
    Candidate("plain-dpo", "demo", ("dpo.sft_weight=0",), "plain sigmoid DPO, without the chosen answers' LM loss",
              reuses="demo"),
    Candidate("neg-no-other-stage", "demo", ("dpo.negative_types=[other_persona,non_personified,induced]",),
              "DPO without other-stage negatives", reuses="demo"),
    Candidate("demo-seed-7", "demo", ("seed=7",),
              "the demo preset with another project seed (its own data split, questions, probes and training order): "
              "how far one demo run's margin is the recipe's and how far its draw's", replicates="demo"),
    Candidate("demo-seed-3", "demo", ("seed=3",),
              "a third project seed for the demo, chosen before it was run (2026-12-04) and reported beside the "
              "first two whatever it gave", replicates="demo"),
    Candidate("cpu", "cpu", (), "the cpu preset (twice the data, about eight SFT epochs, more probes: about an hour)",
              compare_with="demo"),
    Candidate("cpu-seed-7", "cpu", ("seed=7",),
              "the cpu preset under another project seed, against demo-seed-7's DPO model on its probes",
              compare_with="demo-seed-7", replicates="cpu"),
    Candidate("cpu-dpo-20", "cpu", ("dpo.max_steps=20", "dpo.save_steps=10"),
              "the cpu preset with twice the DPO steps (its setting until 2026-12-03)", reuses="cpu",
              compare_with="demo"),
    Candidate("cpu-lm-3", "cpu", ("dpo.max_steps=20", "dpo.save_steps=10", "dpo.sft_weight=3"),
              "cpu-dpo-20 with three times the chosen answers' LM loss in DPO (closer to the SFT model)",
              reuses="cpu", compare_with="demo"),
    Candidate("cpu-ordinary", "cpu", ("construct.kinds={ordinary: 0.6, opinion: 0.2, induced: 0.2}",),
              "the cpu preset with its extra questions per passage spent on ordinary ones (the demo's number of "
              "induced items per passage, three times its ordinary ones)", compare_with="demo"),
    Candidate("cpu-steps-200", "cpu", ("sft.max_steps=200", "sft.save_steps=100"),
              "the cpu preset with half the SFT steps (about five epochs: where is the knee?)", compare_with="demo"),
)


def named(name: str) -> Candidate:
    """The candidate called `name`."""
    return next(c for c in CANDIDATES if c.name == name)


def selected(names: str | None) -> list[Candidate]:
    """Candidates named in a comma-separated list (all when empty); unknown names are an error."""
    if not names:
        return list(CANDIDATES)
    by_name = {c.name: c for c in CANDIDATES}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown recipe candidate(s): {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def persllm(*args: str, log: Path, module: str = "persllm") -> float:
    """Run the persllm CLI (or another `python -m` module) in a subprocess (each run frees its memory), appending to
    `log`; return wall seconds."""
    started = time.monotonic()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {module} {' '.join(args)}\n")
        out.flush()
        proc = subprocess.run([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {proc.returncode}); see {log}")
    return time.monotonic() - started


def shared_data(persona: str, preset: str, workdir: Path) -> Path:
    """The persona's ingest and construct outputs for a preset, built once."""
    out = workdir / persona / f"data-{preset}"
    if not (out / "construct" / "manifest.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        persllm("construct", str(ROOT / "examples" / persona), "--preset", preset, "--output", str(out),
                log=workdir / persona / "log.txt")
    return out


def run_candidate(persona: str, candidate: Candidate, workdir: Path) -> dict[str, Any]:
    """Train and evaluate one candidate on one persona (or read its earlier result)."""
    folder = workdir / persona / candidate.name
    result_file = folder / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text(encoding="utf-8"))
        if "recall" not in result:  # a result from before the recall column: its models are still there
            result["recall"] = trained_recall(persona, candidate, folder)
            result_file.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return result
    data = shared_data(persona, candidate.preset, workdir)
    out = folder / "out"
    for stage in TRAINED:  # the pipeline sees current ingest/construct outputs and skips them
        if not (out / stage).exists():
            shutil.copytree(data / stage, out / stage)
    if candidate.reuses:  # same SFT and DPO settings: their fingerprints match and the pipeline skips them
        run_candidate(persona, named(candidate.reuses), workdir)
        for stage in ("sft", "dpo"):
            if not (out / stage).exists():
                shutil.copytree(workdir / persona / candidate.reuses / "out" / stage, out / stage,
                                ignore=shutil.ignore_patterns("checkpoints"))
    settings = list(candidate.overrides)
    reference = ""
    if candidate.compare_with:  # its own data, so other probes: the other DPO model answers them here as well
        run_candidate(persona, named(candidate.compare_with), workdir)
        from persllm.models import embedded_hf_dir

        adapter = workdir / persona / candidate.compare_with / "out" / "dpo" / "adapter"
        reference = f"hf:{embedded_hf_dir()}+{adapter}"
        settings.append(f"eval.models=[base,sft,dpo,'{reference}']")
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    seconds = persllm("run", str(ROOT / "examples" / persona), "--preset", candidate.preset, "--output", str(out),
                      *overrides, log=folder / "log.txt")
    report = json.loads((out / "eval" / "report.json").read_text(encoding="utf-8"))
    result = summarize(report, candidate, seconds, reference)
    result["recall"] = trained_recall(persona, candidate, folder)
    result_file.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def trained_recall(persona: str, candidate: Candidate, folder: Path) -> dict[str, Any]:
    """The SFT and DPO models asked their own training questions (benchmarks/recall.py), in a subprocess."""
    file = folder / "recall.json"
    persllm(str(ROOT / "examples" / persona), "--output", str(folder / "out"), "--preset", candidate.preset,
            "--json", str(file), log=folder / "log.txt", module="benchmarks.recall")
    found = json.loads(file.read_text(encoding="utf-8"))
    return {m: {k: v for k, v in r.items() if k != "examples"} for m, r in found["models"].items()}


def summarize(report: dict[str, Any], candidate: Candidate, seconds: float, reference: str = "") -> dict[str, Any]:
    """What the table needs from one eval report (`reference`: the model of another candidate it also evaluated)."""
    models = {m["name"] for m in report["models"]} - {reference}
    probes = report["probes"]["models"]
    paired = {(p["a"], p["b"]): p for p in report["probes"]["paired"]}
    smoke = report.get("smoke") or {}
    return {
        "candidate": candidate.name, "what": candidate.what, "preset": candidate.preset,
        "overrides": list(candidate.overrides), "seconds": round(seconds, 1),
        "probes": {m: probes[m]["overall"] for m in models},
        "results": {m: probes[m]["results"] for m in models},
        "by_kind": {m: {k: [v["passed"], v["n"]] for k, v in probes[m].get("by_kind", {}).items()} for m in models},
        "format": {m: report["format"]["models"][m]["rate"] for m in models},
        "perplexity": {m: report["precision"]["perplexity"][m].get("overall") for m in models},
        "dpo_vs_base": paired.get(("base", "dpo")),
        "sft_vs_base": paired.get(("base", "sft")),
        "smoke": {k: bool(v.get("ok")) for k, v in smoke.items() if isinstance(v, dict) and "ok" in v},
        "timings": report.get("timings"),
        "reference": ({"candidate": candidate.compare_with, "results": report["probes"]["models"][reference]["results"],
                       "probes": report["probes"]["models"][reference]["overall"]} if reference else None),
    }


def versus(result: dict[str, Any], reference: dict[str, Any] | None, model: str = "dpo") -> dict[str, Any] | None:
    """Paired difference of `model` between two candidates on the probes both answered."""
    from persllm.eval.metrics import paired

    if result.get("reference"):  # the reference model answered this candidate's own probes
        a, b = _answers(result, "reference"), _answers(result, model)
    elif reference is None or result is reference or model not in result["results"] \
            or model not in reference["results"]:
        return None
    else:
        a, b = reference["results"][model], result["results"][model]
    shared = [k for k in a if k in b]
    return paired([a[k] for k in shared], [b[k] for k in shared]).as_dict()


def pooled(rows: list[dict[str, Any]], name: str, model: str = "dpo", against: str = "base") -> dict[str, Any] | None:
    """Paired difference of `model` against `against` over candidate `name` and its replicates (other seeds), each
    on its own probes: one run turns on a probe or two, the pool on n times the runs."""
    from persllm.eval.metrics import paired

    a: list[bool] = []
    b: list[bool] = []
    for r in _runs_of(rows, name):
        x, y = _answers(r, against), _answers(r, model)
        shared = [k for k in x if k in y]
        a += [x[k] for k in shared]
        b += [y[k] for k in shared]
    return paired(a, b).as_dict() if a else None


def _answers(result: dict[str, Any], model: str) -> dict[str, bool]:
    """One model's probe results in a run; "reference" names the compared candidate's DPO model (cpu against demo),
    which answered this run's probes too."""
    if model == "reference":
        return (result.get("reference") or {}).get("results", {})
    return result["results"].get(model, {})


def _runs_of(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The results of candidate `name` and of its replicates."""
    return [r for r in rows if r["candidate"] == name or named(r["candidate"]).replicates == name]


def pooled_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per persona and candidate with replicates: SFT and DPO against the base over all its seeds."""
    lines = []
    for persona, rows in results.items():
        for name in dict.fromkeys(named(r["candidate"]).replicates for r in rows if named(r["candidate"]).replicates):
            runs = _runs_of(rows, name)
            if len(runs) < 2:
                continue
            dpo, sft = pooled(runs, name), pooled(runs, name, "sft")
            n = dpo["n"] if dpo else 0
            line = f"{persona} / {name} over {len(runs)} seeds (n={n}): SFT vs base {_diff(sft)}, DPO vs base {_diff(dpo)}"
            if named(name).compare_with and (versus_reference := pooled(runs, name, against="reference")):
                line += f", DPO vs {named(name).compare_with}'s DPO {_diff(versus_reference)}"
            lines.append(line)
    return lines


def _pct(estimate: dict[str, Any] | None) -> str:
    if not estimate or estimate.get("mean") is None:
        return "n/a"
    return f"{100 * estimate['mean']:.0f}% [{100 * estimate['low']:.0f}, {100 * estimate['high']:.0f}]"


def _diff(test: dict[str, Any] | None) -> str:
    if not test or test["difference"]["mean"] is None:
        return "-"
    d = test["difference"]
    return (f"{100 * d['mean']:+.0f} [{100 * d['low']:+.0f}, {100 * d['high']:+.0f}] "
            f"p={test['p_value']:.2g}" if test.get("p_value") is not None else f"{100 * d['mean']:+.0f}")


def kinds(result: dict[str, Any], model: str = "dpo") -> str:
    """A model's passes per probe kind ('identity 4/8, knowledge 0/10'): which abilities a pass rate is made of."""
    found = (result.get("by_kind") or {}).get(model) or {}
    return ", ".join(f"{kind} {passed}/{n}" for kind, (passed, n) in found.items()) or "-"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: one row per persona and candidate."""
    lines = [("| persona | candidate | probes base / SFT / DPO | DPO vs base | DPO vs demo | off-format SFT / DPO "
              "| ppl base / DPO | smoke SFT / DPO | trained facts recalled SFT / DPO | minutes | DPO by kind |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for persona, rows in results.items():
        reference = next((r for r in rows if r["candidate"] == "demo"), None)
        for r in rows:
            probes = " / ".join(f"{r['probes'][m]['passed']}/{r['probes'][m]['n']}" if m in r["probes"] else "-"
                                for m in ("base", "sft", "dpo"))
            fmt = " / ".join(_pct(r["format"].get(m)) for m in ("sft", "dpo"))
            ppl = " / ".join(f"{r['perplexity'].get(m):.1f}" if r["perplexity"].get(m) else "-" for m in ("base", "dpo"))
            smoke = " / ".join({True: "pass", False: "fail"}.get(r["smoke"].get(m), "-") for m in ("sft", "dpo"))
            recall = " / ".join(f"{got['passed']}/{got['n']}" if (got := (r.get("recall") or {}).get(m)) else "-"
                                for m in ("sft", "dpo"))
            lines.append(f"| {persona} | {r['candidate']} | {probes} | {_diff(r['dpo_vs_base'])} | "
                         f"{_diff(versus(r, reference))} | {fmt} | {ppl} | {smoke} | {recall} | {r['seconds'] / 60:.0f} | "
                         f"{kinds(r)} |")
    return "\n".join(lines)


def summary(results: dict[str, list[dict[str, Any]]]) -> str:
    """The table, then the pooled lines of candidates run under several seeds."""
    return "\n".join([table(results), "", *pooled_lines(results)])


def sweep(candidates: list[Candidate], personas: list[str], workdir: Path) -> dict[str, list[dict[str, Any]]]:
    """Run every candidate on every persona (resuming), printing each result as it lands."""
    results: dict[str, list[dict[str, Any]]] = {}
    for persona in personas:
        for candidate in candidates:
            print(f"  {persona} / {candidate.name}: {candidate.what} ...", flush=True)
            result = run_candidate(persona, candidate, workdir)
            results.setdefault(persona, []).append(result)
            print(f"    probes {json.dumps({m: p['passed'] for m, p in result['probes'].items()})} of "
                  f"{next(iter(result['probes'].values()))['n']}, {result['seconds'] / 60:.1f} min", flush=True)
    (workdir / "recipe.md").write_text(summary(results) + "\n", encoding="utf-8")
    return results


def run() -> list[dict[str, Any]]:
    """Entry point for `python -m benchmarks recipe` (selection from $PERSLLM_RECIPE, $PERSLLM_RECIPE_PERSONAS)."""
    workdir = Path(os.environ.get("PERSLLM_RECIPE_DIR", ROOT / "benchmarks" / ".recipe"))
    personas = [p for p in os.environ.get("PERSLLM_RECIPE_PERSONAS", ",".join(PERSONAS)).split(",") if p]
    results = sweep(selected(os.environ.get("PERSLLM_RECIPE")), personas, workdir)
    print(summary(results), flush=True)
    rows = []
    for persona, items in results.items():
        for r in items:
            dpo, base = r["probes"].get("dpo"), r["probes"].get("base")
            if not dpo or not base:
                continue
            rows.append({"benchmark": f"recipe {persona} {r['candidate']}", "persllm": 100 * (dpo["mean"] or 0),
                         "baseline": 100 * (base["mean"] or 0), "unit": "%",
                         "ratio": (dpo["mean"] / base["mean"]) if base["mean"] else float("nan"),
                         "higher_is_better": True, "baseline_name": "the prompted base model, same probes",
                         "note": f"DPO vs base {_diff(r['dpo_vs_base'])}; {r['what']}",
                         "seconds": r["seconds"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default="", help=f"comma-separated, of: {', '.join(c.name for c in CANDIDATES)}")
    parser.add_argument("--personas", default=",".join(PERSONAS), help="example persona folders under examples/")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".recipe")
    args = parser.parse_args()
    results = sweep(selected(args.candidates), [p for p in args.personas.split(",") if p], args.workdir)
    print(summary(results))


if __name__ == "__main__":
    main()
