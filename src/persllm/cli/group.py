"""The `persllm` click group and what every command shares: the project options and loading the project. The
command modules register on `cli`; `persllm.cli.main` imports them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from persllm import __version__

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


def load(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None):
    """Load and validate the project with CLI overrides."""
    from persllm.config import load_project

    extra = list(overrides) + ([f"output_dir={output.resolve()}"] if output else [])
    return load_project(project, overrides=extra, preset=preset)
