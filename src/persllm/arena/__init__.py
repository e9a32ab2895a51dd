"""Human A/B evaluation: a person sees a held-out question and two anonymised answers from two models of the same
persona, and picks the more in-character one (or a tie). Answers are generated beforehand and stored with the votes in
SQLite, so the page never waits on a model; results are win rates and a Bradley-Terry ranking with bootstrap
confidence intervals.

    store = ArenaStore(default_db(project))
    prepare(project, store, ["base", "dpo"], heldout_questions(project, 40))
    app = create_arena_app(project, store, admin_key=KEY)  # persllm.arena.app; serve with persllm.serve.http.run_server
"""

from __future__ import annotations

from pathlib import Path

from persllm.arena.prepare import heldout_questions, prepare
from persllm.arena.rank import Standing, bradley_terry, standings
from persllm.arena.store import ArenaLimits, ArenaStore, Ballot, Question, Vote
from persllm.config import Project

__all__ = ["ArenaLimits", "ArenaStore", "Ballot", "Question", "Standing", "Vote", "bradley_terry", "default_db",
           "heldout_questions", "prepare", "standings"]


def default_db(project: Project) -> Path:
    """The project's vote database: <output>/arena/arena.sqlite."""
    return project.output / "arena" / "arena.sqlite"
