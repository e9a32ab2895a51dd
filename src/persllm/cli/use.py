"""`persllm serve`, `persllm converse` and `persllm arena`: personas behind an API, in conversation, and in A/B votes.

Personas are named as PROJECT[@STAGE][:VARIANT], e.g. examples/ada-lovelace@mature:dpo; without a stage, serve
offers every stage and converse uses the last one; without a variant, the best trained one (dpo > sft > base).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from persllm.cli.display import BarProgress, console, summary_table
from persllm.cli.group import cli, load, project_options

TARGET = re.compile(r"^(?P<path>.+?)(?:@(?P<stage>[a-z0-9][a-z0-9_-]{0,31}))?(?::(?P<variant>.+))?$")
METAVAR = "PROJECT[@STAGE][:VARIANT]"


def parse_target(text: str) -> tuple[Path, str | None, str | None]:
    """Split PROJECT[@STAGE][:VARIANT]; an existing path is taken whole."""
    match = TARGET.match(text)
    if Path(text).exists() or match is None:
        return Path(text), None, None
    return Path(match["path"]), match["stage"], match["variant"]


def _targets(texts: Sequence[str], preset: str | None,
             overrides: Sequence[str]) -> list[tuple[Any, str | None, str | None]]:
    """Load every project and check stages and adapters before any model loads."""
    from persllm.variants import check_variant

    found = []
    for text in texts:
        path, stage, variant = parse_target(text)
        project = load(path, preset, overrides, None)
        if stage is not None:
            project.stage(stage)
        if variant is not None:
            check_variant(project, variant)
        found.append((project, stage, variant))
    return found


def _shared(func: Callable[..., Any]) -> Callable[..., Any]:
    """--preset and --set for commands that take several projects (the overrides apply to each)."""
    func = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a setting in every project, e.g. --set base_model=hf:PATH (repeatable).")(func)
    return click.option("--preset", default=None, help="Named sizes: default, demo (~15 min on 2 CPU cores) or cpu (~1 hour).")(func)


@cli.command()
@click.argument("projects", nargs=-1, required=True, metavar=f"{METAVAR}...")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 = everywhere).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-keys", "keys_file", type=click.Path(path_type=Path), default=None,
              help="File with one API key per line; keys in $PERSLLM_API_KEYS (comma-separated) count too. "
                   "Without keys the server is open.")
@click.option("--max-concurrency", type=int, default=4, show_default=True, help="Generations running at once.")
@click.option("--max-queue", type=int, default=32, show_default=True,
              help="Requests waiting for a slot; more get HTTP 503.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds per request once started.")
@click.option("--max-loaded", type=int, default=2, show_default=True, help="Models kept in memory (LRU).")
@click.option("--max-context", type=click.IntRange(min=16), default=8192, show_default=True,
              help="Prompt plus answer tokens per request on a local model (at most its own context); longer "
                   "prompts get HTTP 400 context_length_exceeded.")
@_shared
def serve(projects: Sequence[str], host: str, port: int, keys_file: Path | None, max_concurrency: int,
          max_queue: int, timeout: float, max_loaded: int, max_context: int, preset: str | None,
          overrides: Sequence[str]) -> None:
    """Serve personas through an OpenAI-compatible API (/v1/models, /v1/chat/completions)."""
    from persllm.serve.app import create_app
    from persllm.serve.http import bind_socket, load_api_keys, run_server
    from persllm.serve.ids import Served
    from persllm.serve.parse import Limits

    targets = _targets(projects, preset, overrides)
    keys = load_api_keys(keys_file)
    sock = bind_socket(host, port)  # a port in use fails here, before anything heavy happens
    limits = Limits(max_concurrency=max_concurrency, max_queue=max_queue, timeout=timeout, max_context=max_context)
    app = create_app([Served(p, s, v) for p, s, v in targets], api_keys=keys, limits=limits, max_loaded=max_loaded)
    rows = [[escape(e.id), escape(e.project.name), e.stage, e.variant] for e in app.state.entries.values()]
    console.print(summary_table("Models", rows, ["id", "persona", "stage", "variant"]))
    access = f"{len(keys)} API key(s) required" if keys else "no API keys: anyone who can reach it may use it"
    console.print(f"OpenAI-compatible API at [bold]http://{host}:{sock.getsockname()[1]}/v1[/bold] ({access}); "
                  "models load on first use. Ctrl-C stops.")
    run_server(app, sock, log_level="warning")


@cli.command()
@click.argument("agents", nargs=-1, required=True, metavar=f"{METAVAR}...")
@click.option("--topic", required=True, help="What the agents talk about.")
@click.option("--turns", type=int, default=6, show_default=True, help="Turns in all (not per agent).")
@click.option("--mode", type=click.Choice(["debate", "collaboration"]), default="debate", show_default=True)
@click.option("--policy", type=click.Choice(["round_robin", "addressed", "model"]), default="round_robin",
              show_default=True, help="Who speaks next: in turn, whoever was named, or as a model decides.")
@click.option("--judge", default=None, help="Backend spec (e.g. openai:gpt-4o-mini) that judges stances and, with "
                                            "--policy model, picks speakers (default: stances by text similarity, "
                                            "speakers picked by the agents' own model).")
@click.option("--embedding-model", default="", help="sentence-transformers model for similarity-based stances "
                                                    "(default: TF-IDF).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for transcript.jsonl and transcript.md (default: conversations/<time>).")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--max-tokens", type=int, default=200, show_default=True)
@_shared
def converse(agents: Sequence[str], topic: str, turns: int, mode: str, policy: str, judge: str | None,
             embedding_model: str, out: Path | None, temperature: float, max_tokens: int, preset: str | None,
             overrides: Sequence[str]) -> None:
    """Let personas (from different projects and stages) debate or collaborate on a topic."""
    from persllm import converse as talk
    from persllm import variants
    from persllm.backends import open_backend
    from persllm.backends.base import GenParams
    from persllm.config import parse_model_spec
    from persllm.errors import ConfigError

    if len(agents) < 2:
        raise ConfigError("a conversation needs at least two agents, e.g. examples/ada-lovelace examples/marie-curie")
    members = [(p, s or p.stages[-1].id, v or variants.available(p)[-1]) for p, s, v in _targets(agents, preset,
                                                                                                overrides)]
    try:
        judge_spec = parse_model_spec(judge) if judge else None
    except ValueError as exc:
        raise ConfigError(f"--judge: {exc}") from exc
    folder = out or Path("conversations") / time.strftime("%Y%m%d-%H%M%S")
    console.print(f"Loading {len(members)} agents ...")
    people = talk.open_agents(members, variants.open_variant)
    judge_backend = open_backend(judge_spec, seed=members[0][0].seed) if judge_spec else None
    try:
        said = []
        params = GenParams(temperature=temperature, max_tokens=max_tokens)
        for turn in talk.converse(people, topic, turns, mode, policy, judge_backend, params,  # type: ignore[arg-type]
                                  seed=members[0][0].seed):
            console.print(f"[bold]{escape(turn.speaker)}[/bold]: {escape(turn.text or '(no reply)')}")
            said.append(turn)
        report = talk.track_stance(topic, people, said, judge_backend, embedding_model)
    finally:
        for backend in {id(a.backend): a.backend for a in people}.values():
            backend.close()
        if judge_backend is not None:
            judge_backend.close()
    conversation = talk.Conversation(topic, mode, policy, tuple(people), tuple(said), report)
    jsonl, md = talk.write_transcript(conversation, folder)
    rows = [[escape(a.name), str(a.turns), a.verdict, "n/a" if a.score is None else f"{a.score:.2f}", escape(a.detail)]
            for a in report.agents]
    console.print(summary_table(f"Stance consistency ({report.method})", rows,
                                ["agent", "turns", "verdict", "score", "detail"]))
    console.print(f"Transcript: {escape(str(jsonl))} and {escape(str(md))}")


@cli.command()
@project_options
@click.option("--models", default=None, help="Comma-separated models to compare: base, sft, dpo or backend specs "
                                             "(default: every trained variant and base; at least two).")
@click.option("--questions", type=int, default=40, show_default=True, help="Held-out questions to ask.")
@click.option("--db", type=click.Path(path_type=Path), default=None,
              help="Vote database (default: <output>/arena/arena.sqlite).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--export", "export_to", type=click.Path(path_type=Path), default=None,
              help="Write the ranking to this CSV (and the votes beside it as *.votes.csv), then exit.")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--admin-key", envvar="PERSLLM_ARENA_ADMIN_KEY", default=None,
              help="Key that opens the results and CSV exports (also $PERSLLM_ARENA_ADMIN_KEY); without one a random "
                   "key is made and printed.")
@click.option("--votes-per-hour", type=click.IntRange(min=1), default=60, show_default=True,
              help="Votes one voter (browser cookie) may cast per hour; each question counts once per voter anyway.")
@click.option("--new-voters-per-hour", type=click.IntRange(min=1), default=20, show_default=True,
              help="New voter cookies one client address gets per hour; raise it when many voters share an address "
                   "(a NAT or a reverse proxy).")
def arena(project: Path, preset: str | None, overrides: Sequence[str], output: Path | None, models: str | None,
          questions: int, db: Path | None, host: str, port: int, export_to: Path | None, temperature: float,
          max_tokens: int, admin_key: str | None, votes_per_hour: int, new_voters_per_hour: int) -> None:
    """Human A/B evaluation in the browser: which of two anonymised answers is more in character?"""
    import secrets
    from urllib.parse import quote

    from persllm import arena as ab
    from persllm import variants
    from persllm.arena.store import ArenaLimits
    from persllm.backends.base import GenParams
    from persllm.errors import ConfigError
    from persllm.serve.http import bind_socket, run_server

    proj = load(project, preset, overrides, output)
    limits = ArenaLimits(votes_per_window=votes_per_hour, new_voters_per_window=new_voters_per_hour, window_s=3600.0)
    store = ab.ArenaStore(db or ab.default_db(proj), limits)
    if export_to is not None:
        _export(store, export_to)
        return
    names = [m.strip() for m in models.split(",") if m.strip()] if models else variants.available(proj)
    if len(set(names)) < 2:
        raise ConfigError(f"the arena compares at least two models, got {', '.join(names)}; train the persona "
                          f"(`persllm train {project}`) or name an endpoint, e.g. --models base,openai:MODEL@URL")
    for name in names:
        variants.check_variant(proj, name)
    sock = bind_socket(host, port)  # a port in use fails before any model loads
    asked = ab.heldout_questions(proj, questions)
    with BarProgress() as progress:
        made = ab.prepare(proj, store, names, asked,
                          params=GenParams(temperature=temperature, max_tokens=max_tokens), progress=progress)
    from persllm.arena.app import create_arena_app

    key = admin_key or secrets.token_urlsafe(16)
    url = f"http://{host}:{sock.getsockname()[1]}"
    console.print(f"{len(asked)} held-out questions; new answers: "
                  + ", ".join(f"{m} {n}" for m, n in made.items()) + f"; votes go to {escape(str(store.path))}")
    console.print(f"Arena at [bold]{url}/[/bold]. Ctrl-C stops.")
    console.print(f"Results (organiser only, keep the key private): {escape(url)}/results?key={escape(quote(key))}"
                  + ("" if admin_key else " (a new key each start; set one with --admin-key)"), soft_wrap=True)
    run_server(create_arena_app(proj, store, names, admin_key=key), sock, log_level="warning")


def _export(store: Any, path: Path) -> None:
    from persllm.arena.rank import standings, standings_csv, votes_csv
    from persllm.workspace import write_text

    votes = store.votes()
    rows = standings(votes, store.models())
    votes_path = path.with_name(f"{path.stem}.votes.csv")
    write_text(path, standings_csv(rows))
    write_text(votes_path, votes_csv(votes))
    table = [[str(s.rank), escape(s.model), str(s.games), "-" if s.win_rate is None else f"{100 * s.win_rate:.0f}%",
              f"{s.rating:.0f} ({s.low:.0f} to {s.high:.0f})"] for s in rows]
    console.print(summary_table(f"Arena: {len(votes)} votes", table, ["rank", "model", "games", "win rate", "rating"]))
    console.print(f"Wrote {escape(str(path))} and {escape(str(votes_path))}")
