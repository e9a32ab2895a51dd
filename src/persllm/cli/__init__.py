"""The `persllm` command line: a thin layer that loads a project, calls the stage functions and shows results.

    persllm init DIR                 scaffold a persona project
    persllm run DIR [--preset demo]  ingest -> construct -> train (SFT, DPO) -> eval, skipping finished stages
    persllm ingest|construct|train|eval DIR
    persllm chat DIR                 talk to the persona
    persllm export DIR --format trl|llamafactory|axolotl|openai
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from persllm import __version__
from persllm.errors import PersllmError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="persllm")
@click.option("-v", "--verbose", is_flag=True, help="Show info logs from every stage.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Turn material about a person into a personified LLM (the PersLLM method)."""
    from persllm.cli.display import setup_logging

    setup_logging(verbose)
    ctx.obj = {"verbose": verbose}


def project_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """PROJECT argument plus --preset, --set and --output, shared by every command that reads a project."""
    func = click.option("--output", type=click.Path(path_type=Path), default=None,
                        help="Output folder (default: <project>/out).")(func)
    func = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a setting, e.g. --set sft.max_steps=20 (repeatable).")(func)
    func = click.option("--preset", default=None, help="Named sizes: default, demo (~15 min on 2 CPU cores) or cpu (~1 hour).")(func)
    return click.argument("project", type=click.Path(path_type=Path))(func)


def load(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None):  # type: ignore[no-untyped-def]
    """Load and validate the project with CLI overrides."""
    from persllm.config import load_project

    extra = list(overrides) + ([f"output_dir={output.resolve()}"] if output else [])
    return load_project(project, overrides=extra, preset=preset)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: PersllmErrors become one-line messages and exit code 1; Ctrl-C exits 130."""
    from persllm.cli import chat, commands, use  # noqa: F401  (registers the commands)

    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="persllm", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("interrupted; run the same command again to resume", 130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except PersllmError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", 130)


def _fail(message: str, code: int) -> None:
    from rich.markup import escape

    from persllm.cli.display import console

    console.print(f"[bold red]Error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)
