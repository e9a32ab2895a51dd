"""`persllm chat`: a streaming terminal conversation with the persona."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click
from rich.markup import escape

from persllm.cli.display import console
from persllm.cli.group import cli, load, project_options

HELP = """commands: /stage ID  switch life stage   /analysis on|off  show the chain of thought
          /reset  forget the conversation    /save FILE  save the transcript (.md or .jsonl)   /quit"""


@cli.command()
@project_options
@click.option("--stage", "stage_id", default=None, help="Life stage to talk to (default: the last one).")
@click.option("--model", default=None, help="base, sft, dpo, or a backend spec (default: the best trained model).")
@click.option("--show-analysis", is_flag=True, help="Show the model's analysis before each answer.")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--max-tokens", type=int, default=256, show_default=True)
def chat(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, stage_id: str | None,
         model: str | None, show_analysis: bool, temperature: float, max_tokens: int) -> None:
    """Talk to the persona in the terminal (streaming)."""
    from persllm import variants
    from persllm.backends.base import GenParams
    from persllm.chat import AnswerFilter, Session

    proj = load(project, preset, overrides, output)
    if stage_id is not None:
        proj.stage(stage_id)  # unknown stage: a clear error before any model loads
    name = model or variants.available(proj)[-1]
    console.print(f"Loading [bold]{escape(name)}[/bold] for {escape(proj.name)} ...")
    backend = variants.open_variant(proj, name)
    session = Session(proj, backend, stage_id, GenParams(temperature=temperature, max_tokens=max_tokens))
    interactive = sys.stdin.isatty()
    console.print(f"Talking to {escape(proj.name)} at stage [bold]{session.stage}[/bold] "
                  f"({escape(proj.stage(session.stage).label)}) with {escape(name)}.\n{HELP}")
    show = show_analysis
    try:
        while True:
            try:
                line = console.input("[bold]you> [/bold]") if interactive else input()
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                done, show = _command(session, text, show)
                if done:
                    break
                continue
            answer = AnswerFilter(show)
            click.echo(f"{proj.name}> ", nl=False)
            for piece in session.ask(text):
                click.echo(answer.feed(piece), nl=False)
            click.echo(answer.finish())
    finally:
        backend.close()


def _command(session, text: str, show: bool) -> tuple[bool, bool]:
    """Handle a /command; returns (quit?, show_analysis)."""
    from persllm.errors import ConfigError

    name, _, arg = text[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        return True, show
    if name == "stage":
        try:
            session.set_stage(arg)
            console.print(f"now at stage {session.stage} ({escape(session.project.stage(session.stage).label)}); "
                          "conversation reset")
        except ConfigError as exc:
            console.print(f"[red]{escape(str(exc))}[/red]")
    elif name == "analysis":
        show = arg.lower() in ("on", "yes", "1", "true")
        console.print(f"analysis {'shown' if show else 'hidden'}")
    elif name == "reset":
        session.reset()
        console.print("conversation reset")
    elif name == "save":
        path = session.save(Path(arg or "transcript.md"))
        console.print(f"saved {len(session.turns)} turns to {escape(str(path))}")
    else:
        console.print(HELP)
    return False, show
