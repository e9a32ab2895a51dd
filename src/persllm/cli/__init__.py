"""The `persllm` command line: a thin layer that loads a project, calls the stage functions and shows results.

    persllm init DIR                 scaffold a persona project
    persllm run DIR [--preset demo]  ingest -> construct -> train (SFT, DPO) -> eval, skipping finished stages
    persllm ingest|construct|train|eval DIR
    persllm chat DIR                 talk to the persona
    persllm export DIR --format trl|llamafactory|axolotl|openai
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from persllm.cli.group import cli
from persllm.errors import PersllmError


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
