"""Arena storage in SQLite: questions, pre-generated answers, ballots and votes.

Every call opens its own connection (safe from any thread), the database runs in WAL mode with a busy timeout, and
every write is one short `BEGIN IMMEDIATE` transaction: a writer takes the write lock up front, so concurrent voters
queue on the busy timeout instead of failing on a lock upgrade, and no vote is lost.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Sequence
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

    @property
    def winner(self) -> str | None:
        """The model that won, or None for a tie."""
        return {"left": self.left_model, "right": self.right_model}.get(self.choice)


class ArenaStore:
    """The arena database at `path` (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

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

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:  # type: ignore[type-arg]
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

    # -- ballots and votes --------------------------------------------------------------------------------------
    def ballot(self, models: Sequence[str], rng: random.Random | None = None) -> Ballot | None:
        """A new ballot for the least-voted (question, pair of models) with both answers; None if there is none."""
        rng = rng or random.Random(secrets.randbits(64))
        answers: dict[str, dict[str, str]] = {}
        for qid, model, answer in self._read("SELECT question_id, model, answer FROM answers"):
            if model in models:
                answers.setdefault(qid, {})[model] = answer
        counts = Counter((qid, frozenset((a, b))) for qid, a, b in
                         self._read("SELECT question_id, left_model, right_model FROM votes"))
        options = [(qid, pair) for qid, given in answers.items()
                   for pair in itertools.combinations(sorted(given), 2)]
        if not options:
            return None
        fewest = min(counts[(qid, frozenset(pair))] for qid, pair in options)
        qid, pair = rng.choice([o for o in options if counts[(o[0], frozenset(o[1]))] == fewest])
        left, right = rng.sample(pair, 2)  # random order: position must not give the model away
        token = secrets.token_urlsafe(16)
        with self._write() as db:
            db.execute("INSERT INTO ballots VALUES (?, ?, ?, ?, ?)", (token, qid, left, right, time.time()))
            row = db.execute("SELECT id, stage, question FROM questions WHERE id = ?", (qid,)).fetchone()
        return Ballot(token, Question(*row), left, right, answers[qid][left], answers[qid][right])

    def vote(self, token: str, choice: str, comment: str = "") -> Vote:
        """Record the verdict on a ballot; each ballot counts once."""
        if choice not in CHOICES:
            raise DataError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self._write() as db:
            row = db.execute("SELECT b.question_id, q.stage, q.question, b.left_model, b.right_model FROM ballots b "
                             "JOIN questions q ON q.id = b.question_id WHERE b.token = ?", (token,)).fetchone()
            if row is None:
                raise DataError("unknown ballot; reload the page to get a new question")
            now = time.time()
            try:
                cursor = db.execute("INSERT INTO votes (token, question_id, left_model, right_model, choice, comment,"
                                    " created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                    (token, row[0], row[3], row[4], choice, comment.strip()[:2000], now))
            except sqlite3.IntegrityError:
                raise DataError("this ballot has already been voted on; reload the page for a new one") from None
        return Vote(int(cursor.lastrowid or 0), Question(*row[:3]), row[3], row[4], choice, comment.strip(), now)  # type: ignore[arg-type]

    def votes(self) -> list[Vote]:
        """Every vote, oldest first."""
        rows = self._read("SELECT v.id, v.question_id, q.stage, q.question, v.left_model, v.right_model, v.choice, "
                          "v.comment, v.created FROM votes v JOIN questions q ON q.id = v.question_id ORDER BY v.id")
        return [Vote(r[0], Question(r[1], r[2], r[3]), r[4], r[5], r[6], r[7], r[8]) for r in rows]
