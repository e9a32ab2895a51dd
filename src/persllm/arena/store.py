"""Arena storage in SQLite: questions, pre-generated answers, voters, ballots and votes.

Every call opens its own connection (safe from any thread), the database runs in WAL mode with a busy timeout, and
every write is one short `BEGIN IMMEDIATE` transaction: a writer takes the write lock up front, so concurrent voters
queue on the busy timeout instead of failing on a lock upgrade, and no vote is lost.

Integrity: a voter (the web app's cookie id) votes at most once per question and at most `votes_per_window` times per
window, only on ballots handed to them; ballots expire after `ballot_ttl_s`, and each voter keeps at most
`pending_per_voter` unvoted ones, so reloading the page cannot grow the database. Voter ids are stored hashed: the
database and its exports cannot be used to vote as someone else. The schema is versioned (PRAGMA user_version) and
older databases are migrated in place when opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from persllm.errors import DataError

Choice = Literal["left", "right", "tie"]
CHOICES: tuple[str, ...] = ("left", "right", "tie")
BUSY_TIMEOUT_S = 30.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS questions (id TEXT PRIMARY KEY, stage TEXT NOT NULL, question TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (question_id TEXT NOT NULL REFERENCES questions(id), model TEXT NOT NULL,
    raw TEXT NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (question_id, model));
CREATE TABLE IF NOT EXISTS ballots (token TEXT PRIMARY KEY, question_id TEXT NOT NULL, left_model TEXT NOT NULL,
    right_model TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS votes (id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL UNIQUE,
    question_id TEXT NOT NULL, left_model TEXT NOT NULL, right_model TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')), comment TEXT NOT NULL, created REAL NOT NULL);
"""
# Schema changes since SCHEMA (version 0, the first arena); database version N has run the first N. Append only: an
# existing database runs the ones it lacks when opened, so votes from before a change are kept.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: voters, the voter of each ballot and vote (NULL before), one vote per voter and question
        "CREATE TABLE IF NOT EXISTS voters (id TEXT PRIMARY KEY, created REAL NOT NULL)",
        "ALTER TABLE ballots ADD COLUMN voter TEXT",
        "ALTER TABLE votes ADD COLUMN voter TEXT",
        "CREATE UNIQUE INDEX IF NOT EXISTS votes_voter_question ON votes (voter, question_id)",  # NULLs stay distinct
        "CREATE INDEX IF NOT EXISTS votes_voter_created ON votes (voter, created)",
        "CREATE INDEX IF NOT EXISTS ballots_voter_created ON ballots (voter, created)",
        "CREATE INDEX IF NOT EXISTS ballots_created ON ballots (created)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
COMMENT_CHARS = 2000


@dataclass(frozen=True)
class ArenaLimits:
    """What one voter and one client address may do, and how long a ballot lives."""

    ballot_ttl_s: float = 3600.0  # a ballot not voted on within this time can no longer be voted on
    pending_per_voter: int = 10  # unvoted ballots kept per voter (the oldest go first)
    votes_per_window: int = 60  # votes one voter may cast per window
    window_s: float = 3600.0
    new_voters_per_window: int = 20  # voter ids one client address gets per window (clearing cookies is not a vote)
    max_body: int = 32 * 1024  # bytes of a POST /vote body (a 2000-character comment, percent-encoded, fits)


class RateLimited(DataError):
    """A voter or client address went over one of the ArenaLimits (HTTP 429); trying later helps."""


@dataclass(frozen=True)
class Question:
    """A held-out question asked at one stage."""

    id: str
    stage: str
    question: str


@dataclass(frozen=True)
class Ballot:
    """One question with two answers in random order; the page never sees the model names."""

    token: str
    question: Question
    left_model: str
    right_model: str
    left_answer: str
    right_answer: str


@dataclass(frozen=True)
class Vote:
    """A person's verdict on one ballot."""

    id: int
    question: Question
    left_model: str
    right_model: str
    choice: Choice
    comment: str
    created: float
    voter: str | None = None  # pseudonymous (a hash of the cookie id); None for votes from before voter ids

    @property
    def winner(self) -> str | None:
        """The model that won, or None for a tie."""
        return {"left": self.left_model, "right": self.right_model}.get(self.choice)


def voter_key(voter: str) -> str:
    """How a voter id is stored: a hash, so neither the database nor an export can be used to vote as that voter."""
    return hashlib.sha256(voter.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class ArenaStore:
    """The arena database at `path` (created on first use, migrated to SCHEMA_VERSION when older)."""

    def __init__(self, path: Path, limits: ArenaLimits = ArenaLimits(),
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.limits = limits
        self.clock = clock  # injectable, so tests can let ballots expire and windows pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        with self._write() as db:  # the version is read under the write lock: two openers cannot both migrate
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DataError(f"{self.path} has arena schema version {version}, newer than this persllm's "
                                f"{SCHEMA_VERSION}; upgrade persllm to open it")
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number + 1}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        return db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        with contextlib.closing(self._connect()) as db:
            return db.execute(sql, args).fetchall()

    # -- questions and answers ----------------------------------------------------------------------------------
    def add_questions(self, questions: Sequence[Question]) -> None:
        """Register questions (already known ids are kept as they are)."""
        with self._write() as db:
            db.executemany("INSERT OR IGNORE INTO questions VALUES (?, ?, ?)",
                           [(q.id, q.stage, q.question) for q in questions])

    def questions(self) -> list[Question]:
        """All questions, by id."""
        return [Question(*row) for row in self._read("SELECT id, stage, question FROM questions ORDER BY id")]

    def unanswered(self, model: str, questions: Sequence[Question]) -> list[Question]:
        """The questions that `model` has not answered yet."""
        done = {row[0] for row in self._read("SELECT question_id FROM answers WHERE model = ?", (model,))}
        return [q for q in questions if q.id not in done]

    def add_answer(self, question_id: str, model: str, raw: str, answer: str) -> None:
        """Store one model's answer (one short transaction, so an interrupted preparation resumes)."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                       (question_id, model, raw, answer, time.time()))

    def models(self) -> list[str]:
        """Models with at least one stored answer."""
        return [row[0] for row in self._read("SELECT DISTINCT model FROM answers ORDER BY model")]

    # -- voters, ballots and votes ------------------------------------------------------------------------------
    def new_voter(self) -> str:
        """A fresh voter id (for the web app's cookie)."""
        voter = secrets.token_urlsafe(18)
        with self._write() as db:
            db.execute("INSERT INTO voters VALUES (?, ?)", (voter_key(voter), self.clock()))
        return voter

    def known_voter(self, voter: str) -> bool:
        """Whether `voter` is an id this database handed out (a made-up cookie is not)."""
        return bool(voter) and bool(self._read("SELECT 1 FROM voters WHERE id = ?", (voter_key(voter),)))

    def ballot(self, models: Sequence[str], rng: random.Random | None = None,
               voter: str | None = None) -> Ballot | None:
        """A new ballot for the least-voted (question, pair of models) with both answers; None if there is none."""
        # A voter is never offered a question they voted on; voter None is a trusted caller (scripts, tests).
        rng = rng or random.Random(secrets.randbits(64))
        key = voter_key(voter) if voter is not None else None
        answers: dict[str, dict[str, str]] = {}
        for qid, model, answer in self._read("SELECT question_id, model, answer FROM answers"):
            if model in models:
                answers.setdefault(qid, {})[model] = answer
        counts = Counter((qid, frozenset((a, b))) for qid, a, b in
                         self._read("SELECT question_id, left_model, right_model FROM votes"))
        done = {row[0] for row in self._read("SELECT question_id FROM votes WHERE voter = ?", (key,))} if key else set()
        options = [(qid, pair) for qid, given in answers.items() if qid not in done
                   for pair in itertools.combinations(sorted(given), 2)]
        if not options:
            return None
        fewest = min(counts[(qid, frozenset(pair))] for qid, pair in options)
        qid, pair = rng.choice([o for o in options if counts[(o[0], frozenset(o[1]))] == fewest])
        left, right = rng.sample(pair, 2)  # random order: position must not give the model away
        token = secrets.token_urlsafe(16)
        now = self.clock()
        with self._write() as db:
            db.execute("DELETE FROM ballots WHERE created < ?", (now - self.limits.ballot_ttl_s,))
            db.execute("INSERT INTO ballots (token, question_id, left_model, right_model, created, voter) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (token, qid, left, right, now, key))
            if key is not None:  # every page load makes a ballot: keep only the voter's newest few
                db.execute("DELETE FROM ballots WHERE voter = ? AND token NOT IN (SELECT token FROM ballots WHERE "
                           "voter = ? ORDER BY created DESC, rowid DESC LIMIT ?)",
                           (key, key, self.limits.pending_per_voter))
            row = db.execute("SELECT id, stage, question FROM questions WHERE id = ?", (qid,)).fetchone()
        return Ballot(token, Question(*row), left, right, answers[qid][left], answers[qid][right])

    def vote(self, token: str, choice: str, comment: str = "", voter: str | None = None) -> Vote:
        """Record `voter`'s verdict on a ballot they were given; each ballot counts once, each question once per voter.

        Raises DataError for an unknown, expired, already used or someone else's ballot or a second vote on the same
        question, and RateLimited past the voter's votes per window.
        """
        if choice not in CHOICES:
            raise DataError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        key = voter_key(voter) if voter is not None else None
        comment = comment.strip()[:COMMENT_CHARS]
        limits, now = self.limits, self.clock()
        with self._write() as db:
            if db.execute("SELECT 1 FROM votes WHERE token = ?", (token,)).fetchone():
                raise DataError("this ballot has already been voted on; reload the page for a new one")
            row = db.execute("SELECT b.question_id, q.stage, q.question, b.left_model, b.right_model, b.created, "
                             "b.voter FROM ballots b JOIN questions q ON q.id = b.question_id WHERE b.token = ?",
                             (token,)).fetchone()
            if row is None:
                raise DataError("unknown ballot (or one that expired); reload the page to get a new question")
            if row[5] < now - limits.ballot_ttl_s:
                raise DataError(f"this ballot expired ({limits.ballot_ttl_s / 60:.0f} minutes after it was shown); "
                                "reload the page to get a new question")
            if row[6] != key:
                raise DataError("this ballot was given to another voter; reload the page to get your own")
            if key is not None:
                if db.execute("SELECT 1 FROM votes WHERE voter = ? AND question_id = ?", (key, row[0])).fetchone():
                    raise DataError("you have already voted on this question; reload the page for another one")
                recent = db.execute("SELECT COUNT(*) FROM votes WHERE voter = ? AND created > ?",
                                    (key, now - limits.window_s)).fetchone()[0]
                if recent >= limits.votes_per_window:
                    raise RateLimited(f"one voter may cast {limits.votes_per_window} votes per "
                                      f"{limits.window_s / 60:.0f} minutes; please come back later")
            cursor = db.execute("INSERT INTO votes (token, question_id, left_model, right_model, choice, comment, "
                                "created, voter) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (token, row[0], row[3], row[4], choice, comment, now, key))
            db.execute("DELETE FROM ballots WHERE token = ?", (token,))  # the vote keeps all it needs
        return Vote(int(cursor.lastrowid or 0), Question(*row[:3]), row[3], row[4], choice,  # type: ignore[arg-type]
                    comment, now, key)

    def votes_by(self, voter: str) -> int:
        """How many votes `voter` has cast."""
        return int(self._read("SELECT COUNT(*) FROM votes WHERE voter = ?", (voter_key(voter),))[0][0])

    def pending(self) -> int:
        """Ballots handed out and not voted on (expired ones included until the next ballot clears them)."""
        return int(self._read("SELECT COUNT(*) FROM ballots")[0][0])

    def votes(self) -> list[Vote]:
        """Every vote, oldest first."""
        rows = self._read("SELECT v.id, v.question_id, q.stage, q.question, v.left_model, v.right_model, v.choice, "
                          "v.comment, v.created, v.voter FROM votes v JOIN questions q ON q.id = v.question_id "
                          "ORDER BY v.id")
        return [Vote(r[0], Question(r[1], r[2], r[3]), r[4], r[5], r[6], r[7], r[8], r[9]) for r in rows]
