"""Stage commands: init, ingest, construct, train, eval, run, export."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from persllm.cli import cli, load, project_options
from persllm.cli.display import BarProgress, console, summary_table

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
def train(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, only: str | None,
          force: bool) -> None:
    """SFT on personified + general data, then automated DPO."""
    stages = ["ingest", "construct"] + ([only] if only else ["sft", "dpo"])
    _run_stages(load(project, preset, overrides, output), stages, force, force_only=only)


@cli.command(name="eval")
@project_options
@click.option("--models", default=None, help="Comma-separated models: base, rag, sft, dpo, or an endpoint such as "
                                              "openai:gpt-4o-mini (default from eval.models).")
@click.option("--probes", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Extra probe file (JSONL) to score.")
@click.option("--force", is_flag=True, help="Re-evaluate even if the report is current.")
def eval_(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, models: str | None,
          probes: Path | None, force: bool) -> None:
    """Evaluate the prompted base model and the tuned models; write report.json and report.html."""
    extra = list(overrides)
    if models:
        extra.append("eval.models=[" + ",".join(f'"{m.strip()}"' for m in models.split(",") if m.strip()) + "]")
    if probes:
        extra.append(f"eval.probes={probes.resolve()}")
    _run_stages(load(project, preset, extra, output), ["eval"], force, force_only="eval", needs_upstream=True)


@cli.command()
@project_options
@click.option("--force", is_flag=True, help="Redo every stage.")
def run(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, force: bool) -> None:
    """ingest -> construct -> SFT -> DPO -> eval, skipping stages whose outputs are current."""
    from persllm.workspace import STAGES

    _run_stages(load(project, preset, overrides, output), list(STAGES), force)


def _run_stages(project: Any, stages: list[str], force: bool, force_only: str | None = None,
                needs_upstream: bool = False) -> None:
    from persllm import pipeline
    from persllm.workspace import STAGES

    if needs_upstream:
        stages = [s for s in STAGES if STAGES.index(s) <= STAGES.index(stages[-1])]
    forced = [s for s in stages if force and (force_only is None or force_only == s)]
    console.print(f"[bold]{escape(project.name)}[/bold]: {len(project.stages)} stage(s) "
                  f"({', '.join(s.id for s in project.stages)}), preset {project.preset}, "
                  f"teacher {escape(project.teacher.spec)}, base model {escape(project.base_model.spec)}\n"
                  f"output: {escape(str(project.output))}")
    with BarProgress() as progress:
        outcomes = pipeline.run(project, stages, force=forced, progress=progress)
    rows = [[o.stage, "skipped (up to date)" if o.skipped else "done", f"{o.seconds:.0f}s" if not o.skipped else "-",
             escape(pipeline.headline(o.stage, o.stats))] for o in outcomes]
    console.print(summary_table("Summary", rows, ["stage", "status", "time", "result"]))


@cli.command()
@project_options
@click.option("--format", "fmt", type=click.Choice(["trl", "llamafactory", "axolotl", "all"]), default="all",
              show_default=True, help="Target trainer format.")
@click.option("--to", "dest", type=click.Path(path_type=Path), default=None,
              help="Destination folder (default: <output>/export/<format>).")
def export(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, fmt: str,
           dest: Path | None) -> None:
    """Export constructed data (and DPO pairs, once trained) for TRL, LLaMA-Factory or axolotl."""
    from persllm import export as exporter
    from persllm import pipeline
    from persllm.errors import DataError

    proj = load(project, preset, overrides, output)
    ws = pipeline.workspace(proj)
    if ws.manifest("construct") is None:
        raise DataError(f"nothing to export yet: run `persllm construct {project}` first")
    samples = pipeline.load_samples(ws)
    pairs = pipeline.load_pairs(ws, "train") if ws.manifest("dpo") else []
    formats = exporter.FORMATS if fmt == "all" else (fmt,)
    for name in formats:
        target = (dest / name if dest and fmt == "all" else dest) or ws.root / "export" / name
        files = exporter.export(proj, samples, pairs, name, target)
        console.print(f"[bold]{name}[/bold]: " + ", ".join(escape(str(f)) for f in files))
    if not pairs:
        console.print("[dim]DPO pairs are exported once `persllm train` has built them.[/dim]")
