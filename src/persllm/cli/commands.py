"""Stage commands: init, ingest, construct, train, eval, run, export, and compare for eval reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from persllm.cli.display import BarProgress, console, smoke_line, stage_headline, summary_table
from persllm.cli.group import cli, load, project_options

INIT_YAML = """\
# persllm persona project. Only name and stages are required; see the README for optional settings
# (teacher, base_model, construct, sft, dpo, eval, preset).
name: {name}
language: {language}
stages:
{stages}"""

STAGE_YAML = """\
  - id: {id}
    label: "{label}"            # the time the persona lives in at this stage
    description: "{description}"
    knowledge: {id}_knowledge.txt   # objective material (experiences, knowledge), one paragraph per line
    style: {id}_style.txt           # the persona's own words, one paragraph per line
"""


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--name", help="The persona's name (default: the directory name).")
@click.option("--stages", default="early,late", show_default=True, help="Comma-separated stage ids.")
@click.option("--language", type=click.Choice(["en", "zh"]), default="en", show_default=True)
def init(directory: Path, name: str | None, stages: str, language: str) -> None:
    """Scaffold a persona project: persona.yaml and one empty knowledge and style file per stage."""
    from persllm.config import PROJECT_FILE, STAGE_ID
    from persllm.errors import ConfigError
    from persllm.workspace import write_text

    ids = [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in ids if not STAGE_ID.match(s)]
    if not ids or bad or len(set(ids)) != len(ids):
        raise ConfigError(f"--stages needs distinct ids of lowercase letters, digits, '-' or '_'; got {stages!r}")
    if (directory / PROJECT_FILE).exists():
        raise ConfigError(f"{directory / PROJECT_FILE} already exists; edit it or choose another directory")
    persona = name or directory.resolve().name.replace("-", " ").replace("_", " ").title()
    blocks = "".join(STAGE_YAML.format(id=s, label=f"TODO: the year of stage {s}",
                                       description=f"TODO: who {persona} is at this stage.") for s in ids)
    write_text(directory / PROJECT_FILE, INIT_YAML.format(name=persona, language=language, stages=blocks))
    for stage in ids:
        for kind in ("knowledge", "style"):
            path = directory / f"{stage}_{kind}.txt"
            if not path.exists():
                write_text(path, "")
    console.print(f"Created [bold]{escape(str(directory / PROJECT_FILE))}[/bold] with stages {', '.join(ids)}.\n"
                  f"Next: set each stage's label, fill the {2 * len(ids)} .txt files (one paragraph per line), then\n"
                  f"  persllm run {escape(str(directory))} --preset demo")


@cli.command()
@project_options
@click.option("--force", is_flag=True, help="Redo the stage even if its outputs are current.")
def ingest(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, force: bool) -> None:
    """Split material files into passages with provenance."""
    _run_stages(load(project, preset, overrides, output), ["ingest"], force)


@cli.command()
@project_options
@click.option("--force", is_flag=True, help="Redo construct even if its outputs are current (the cache still "
                                            "answers repeated teacher requests).")
def construct(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, force: bool) -> None:
    """Generate questions, chain-of-thought golden answers and DPO material with the teacher."""
    _run_stages(load(project, preset, overrides, output), ["ingest", "construct"], force, force_only="construct")


@cli.command()
@project_options
@click.option("--only", type=click.Choice(["sft", "dpo"]), default=None, help="Run only one training stage.")
@click.option("--force", is_flag=True, help="Retrain even if the adapters are current.")
@click.option("--strict", is_flag=True, help="Exit non-zero (after the summary) when an SFT or DPO smoke test "
                                             "failed (answers that never stop, loop or lack [Response]).")
def train(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, only: str | None,
          force: bool, strict: bool) -> None:
    """SFT on personified + general data, then automated DPO."""
    stages = ["ingest", "construct"] + ([only] if only else ["sft", "dpo"])
    _run_stages(load(project, preset, overrides, output), stages, force, force_only=only, strict=strict)


@cli.command(name="eval")
@project_options
@click.option("--models", default=None, help="Comma-separated models: base, rag, sft, dpo, or an endpoint such as "
                                              "openai:gpt-4o-mini (default from eval.models).")
@click.option("--probes", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Extra probe file (JSONL) to score.")
@click.option("--interview", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Interview questions (JSON list or JSONL) rated 1-7 by the judge; see docs/interviews.md.")
@click.option("--force", is_flag=True, help="Re-evaluate even if the report is current.")
def eval_(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, models: str | None,
          probes: Path | None, interview: Path | None, force: bool) -> None:
    """Evaluate the prompted base model and the tuned models; write report.json and report.html."""
    extra = list(overrides)
    if models:
        extra.append("eval.models=[" + ",".join(f'"{m.strip()}"' for m in models.split(",") if m.strip()) + "]")
    if probes:
        extra.append(f"eval.probes={probes.resolve()}")
    if interview:
        extra.append(f"eval.interview={interview.resolve()}")
    _run_stages(load(project, preset, extra, output), ["eval"], force, force_only="eval", needs_upstream=True)


@cli.command()
@project_options
@click.option("--force", is_flag=True, help="Redo every stage.")
@click.option("--strict", is_flag=True, help="Exit non-zero (after the summary) when an SFT or DPO smoke test "
                                             "failed (answers that never stop, loop or lack [Response]).")
def run(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, force: bool,
        strict: bool) -> None:
    """ingest -> construct -> SFT -> DPO -> eval, skipping stages whose outputs are current."""
    from persllm.workspace import STAGES

    _run_stages(load(project, preset, overrides, output), list(STAGES), force, strict=strict)


def _run_stages(project: Any, stages: list[str], force: bool, force_only: str | None = None,
                needs_upstream: bool = False, strict: bool = False) -> None:
    from persllm import pipeline
    from persllm.workspace import Workspace

    if needs_upstream:
        stages = pipeline.stages_for(project, stages[-1])
    forced = [s for s in stages if force and (force_only is None or force_only == s)]
    console.print(f"[bold]{escape(project.name)}[/bold]: {len(project.stages)} stage(s) "
                  f"({', '.join(s.id for s in project.stages)}), preset {project.preset}, "
                  f"teacher {escape(project.teacher.spec)}, base model {escape(project.base_model.spec)}\n"
                  f"output: {escape(str(project.output))}")
    with BarProgress() as progress:
        outcomes = pipeline.run(project, stages, force=forced, progress=progress)
    rows = [[o.stage, "skipped (up to date)" if o.skipped else "done", f"{o.seconds:.0f}s" if not o.skipped else "-",
             escape(stage_headline(o.stage, o.stats))] for o in outcomes]
    console.print(summary_table("Summary", rows, ["stage", "status", "time", "result"]))
    failed = pipeline.smoke_failures(outcomes)
    ws = Workspace.of(project)
    for stage, smoke in failed:
        line = smoke_line(stage, smoke, ws.stage_dir(stage) / "smoke.json")
        console.print(f"[bold red]WARNING[/bold red] {escape(line)}", highlight=False, soft_wrap=True)
    if "eval" in stages:
        _print_eval(ws.stage_dir("eval"))
    if strict and failed:
        from persllm.errors import SmokeTestError

        raise SmokeTestError("--strict: the generation smoke test failed for " + ", ".join(
            f"{stage} ({', '.join(smoke.get('problems') or ['no answers'])}; {ws.stage_dir(stage) / 'smoke.json'})"
            for stage, smoke in failed))


@cli.command()
@click.argument("report_a", type=click.Path(path_type=Path, exists=True))
@click.argument("report_b", type=click.Path(path_type=Path, exists=True))
def compare(report_a: Path, report_b: Path) -> None:
    """Two eval reports side by side (report.json files or project directories), judge differences first.

    Prints each model's probe pass rate, perplexity and judged scores from both reports; when the judge's spec, the
    model id its endpoint reported or the judge prompt version differ, says so before any number."""
    from persllm.eval.compare import NOT_COMPARABLE, compare_rows, judge_differences, load_report, unverified

    a, b = load_report(report_a), load_report(report_b)
    differences = judge_differences(a, b)
    if differences:
        console.print(f"[bold red]judge differs:[/bold red] {escape('; '.join(differences))} — {NOT_COMPARABLE}",
                      soft_wrap=True)
    for note in unverified(a, b):
        console.print(f"note: {escape(note)}", soft_wrap=True)
    for name, report, path in (("A", a, report_a), ("B", b, report_b)):
        judge = report["judge"]
        console.print(f"{name}: {escape(str(path))} · {escape(str(report.get('persona')))} · "
                      f"{escape(str(report.get('created')))} · judge {escape(_judge_line(judge))}", soft_wrap=True)
    rows = [[escape(c) for c in row] for row in compare_rows(a, b)]
    console.print(summary_table("Comparison", rows, ["model", "measure", "A", "B"]))


def _judge_line(judge: dict[str, Any]) -> str:
    if not judge.get("enabled"):
        return "none"
    reported = judge.get("reported_model")
    shown = ", ".join(reported) if isinstance(reported, list) else reported or "no reported id"
    return f"{judge.get('model')} (reported {shown}, prompts {judge.get('prompt_version')})"


def _print_eval(eval_dir: Path) -> None:
    """The per-model, per-criterion evaluation table and where the full report is."""
    import json

    from persllm.eval import summary_rows

    report_path = eval_dir / "report.json"
    if not report_path.is_file():
        return
    report = json.loads(report_path.read_text(encoding="utf-8"))
    rows = [[escape(c) for c in row] for row in summary_rows(report)]
    console.print(summary_table("Evaluation", rows, ["model", "criterion", "result"]))
    console.print(f"report: {escape(str(eval_dir / 'report.html'))}")


@cli.command()
@project_options
@click.option("--format", "fmt", type=click.Choice(["trl", "llamafactory", "axolotl", "openai", "all"]),
              default=None, help="Target trainer format for the data and configs (default: all, unless --gguf or "
                                 "--merged is given).")
@click.option("--to", "dest", type=click.Path(path_type=Path), default=None,
              help="Destination folder (default: <output>/export/<format>; models: <output>/export/gguf and "
                   "<output>/export/merged).")
@click.option("--gguf", "gguf_types", type=click.Choice(["f16", "q8_0", "f32"]), multiple=True,
              help="Also write the tuned model as GGUF for llama.cpp / Ollama, with persllm's chat template "
                   "(repeatable: --gguf f16 --gguf q8_0; q8_0 needs the llamacpp extra).")
@click.option("--merged", is_flag=True, help="Also write the tuned model merged into the base model (safetensors "
                                             "+ tokenizer + chat template) for vLLM or plain transformers.")
@click.option("--model", "variant", type=click.Choice(["sft", "dpo"]), default=None,
              help="Which tuned model --gguf/--merged export (default: dpo if trained, else sft).")
def export(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, fmt: str | None,
           dest: Path | None, gguf_types: Sequence[str], merged: bool, variant: str | None) -> None:
    """Export what `persllm train` trains on (the SFT mix, test set and DPO pairs) with ready-to-run configs for
    TRL, LLaMA-Factory and axolotl, and as OpenAI fine-tuning files; with --gguf or --merged, export the tuned model
    for llama.cpp, Ollama or vLLM."""
    from persllm import export as exporter
    from persllm import pipeline
    from persllm.errors import DataError
    from persllm.general import load_general
    from persllm.workspace import Workspace

    proj = load(project, preset, overrides, output)
    ws = Workspace.of(proj)
    models = bool(gguf_types) or merged
    if fmt is not None or not models:
        fmt = fmt or "all"
        if ws.manifest("construct") is None:
            raise DataError(f"nothing to export yet: run `persllm construct {project}` first")
        samples = ws.samples()
        pairs, _ = pipeline.build_dpo_pairs(proj, ws, samples)  # the pairs the dpo stage would train on
        general = [list(record.messages) for record in load_general(proj)[0]]
        with console.status("rendering the training records with the base tokenizer"):
            bundle = exporter.build_bundle(proj, samples, pairs, general)
        formats = exporter.FORMATS if fmt == "all" else (fmt,)
        for name in formats:
            target = (dest / name if dest and fmt == "all" else dest) or ws.export_dir / name
            files = exporter.write(bundle, name, target)
            console.print(f"[bold]{name}[/bold]: " + ", ".join(escape(str(f)) for f in files))
        counts = bundle.counts
        console.print(f"[dim]{counts['sft_records']} SFT records ({counts['sft_persona']} personified, "
                      f"{counts['sft_general']} general), {counts['sft_test']} test, {counts['dpo_train']} DPO pairs "
                      f"({counts['dpo_test']} test)[/dim]")
        if not bundle.dpo_train:
            console.print("[dim]No DPO pairs: the constructed data has no negatives of dpo.negative_types.[/dim]")
    if models:
        _export_model(proj, variant, list(dict.fromkeys(gguf_types)), merged, dest or ws.export_dir)


def _export_model(project: Any, variant: str | None, gguf_types: list[str], keep_merged: bool, root: Path) -> None:
    """Merge the tuned variant (kept under root/merged/<variant> with --merged) and write each GGUF type."""
    import shutil
    import tempfile

    from persllm import template
    from persllm.export.gguf import export_ggufs, ollama_modelfile
    from persllm.export.merge import best_variant, merge_variant
    from persllm.workspace import Workspace, write_text

    variant = variant or best_variant(project)
    root.mkdir(parents=True, exist_ok=True)
    scratch = None if keep_merged else Path(tempfile.mkdtemp(prefix=f".merged-{variant}.", dir=root))
    merged_dir = Workspace.of(project).merged_dir(variant, root) if scratch is None else scratch / "model"
    try:
        with console.status(f"merging the {variant.upper()} model into the base model"):
            merge_variant(project, variant, merged_dir)
        if keep_merged:
            console.print(f"[bold]merged[/bold] ({variant}): {escape(str(merged_dir))}")
        targets = {t: root / "gguf" / f"{project.slug}-{variant}-{t}.gguf" for t in gguf_types}
        if targets:
            with console.status("writing " + ", ".join(p.name for p in targets.values())):
                export_ggufs(merged_dir, targets, name=f"{project.name} ({variant})")
        start, end = template.markers_for(_vocab(merged_dir)) if targets else template.TURN_MARKERS[0]
        # Ollama serves one system prompt; the last stage's is the default (edit SYSTEM for another stage)
        system = template.system_prompt(template.context_for(project, project.stages[-1].id))
        for outtype, target in targets.items():
            modelfile = target.with_suffix(".Modelfile")
            write_text(modelfile, ollama_modelfile(target.name, start, end, system))
            console.print(f"[bold]gguf {outtype}[/bold] ({variant}): {escape(str(target))}\n"
                          f"  llama.cpp: llama-server -m {escape(str(target))} --jinja\n"
                          f"  Ollama:    ollama create {project.slug} -f {escape(str(modelfile))}")
        if gguf_types and project.sft.temporal_labels == "tokens":
            console.print("[dim]This persona was trained with stage tokens: start each user message with the "
                          "stage's token (<TIME-I>, <TIME-II>, ...) as persllm chat does.[/dim]")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _vocab(merged_dir: Path) -> set[str]:
    """Token strings of a merged model's tokenizer (to pick its turn markers)."""
    from persllm.export.gguf import hf_vocab

    return {t for t in hf_vocab(merged_dir)[1] if t is not None}


@cli.command(name="inspect")
@project_options
@click.option("--per-group", type=click.IntRange(min=0), default=5, show_default=True,
              help="Random samples (seeded by the project seed) shown per stage and kind.")
def inspect_(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, per_group: int) -> None:
    """Audit constructed data: counts, drop and rejection reasons, audit figures and sample cards with their
    origins and seed passages, written to <output>/construct/audit.html."""
    import json

    from persllm.construct import audit_page
    from persllm.errors import DataError
    from persllm.workspace import Workspace

    proj = load(project, preset, overrides, output)
    ws = Workspace.of(proj)
    out = ws.stage_dir("construct")
    if ws.manifest("construct") is None:
        raise DataError(f"no finished construct stage in {out}: run `persllm construct {project}` first")
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8")) if (out / "stats.json").is_file() else {}
    samples, negatives = ws.samples(), ws.negatives()
    passages = ws.passages() if ws.passages_file.is_file() else []
    path = audit_page.write_audit_page(proj, samples, negatives, passages, stats, out / "audit.html", per_group)
    console.print(f"[bold]{escape(proj.name)}[/bold]: mode {escape(str(stats.get('mode') or 'n/a'))}, teacher "
                  f"{escape(str(stats.get('teacher') or proj.teacher.spec))}, {len(samples)} samples, "
                  f"{len(negatives)} negatives")
    console.print(summary_table("Samples", audit_page.count_rows(proj, samples),
                                ["stage", "kind", "train", "test", "total"]))
    for key, title in (("dropped", "Dropped slots"), ("rejected", "Rejected teacher outputs")):
        rows = audit_page.reason_rows(stats, key)
        if not rows:
            console.print(f"{title}: {'n/a (not recorded by this construct run)' if rows is None else 'none'}")
            continue
        more = [[f"... {len(rows) - 8} more reasons", ""]] if len(rows) > 8 else []
        console.print(summary_table(title, [[escape(c) for c in r] for r in rows[:8]] + more, ["reason", "count"]))
    if isinstance(stats.get("audit"), dict):
        console.print(summary_table("Audit", [[escape(c) for c in r[:2]] for r in audit_page.audit_rows(stats)],
                                    ["figure", "value"]))
    else:
        console.print("Audit figures: n/a (not recorded by this construct run; re-run with --force)")
    console.print(f"audit page: {escape(str(path))}", soft_wrap=True)
