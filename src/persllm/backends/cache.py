"""A response cache in SQLite keyed by backend, request and sampling settings, so re-runs cost nothing."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

from persllm.backends.base import Backend, Completion, GenParams, Request, Result, with_repetition
from persllm.decoding import Repetition
from persllm.errors import BackendError

_LATER_FIELDS = ("repetition_penalty", "no_repeat_ngram")  # GenParams fields added after caches existed


def request_key(backend_name: str, request: Request, params: GenParams, salt: str = "") -> str:
    """Stable hash of everything that determines an answer."""
    body = request if isinstance(request, str) else [[m.role, m.content] for m in request]
    # Unset decoding fields are left out, so keys written before they existed stay valid.
    settings = {k: v for k, v in asdict(params).items() if v is not None or k not in _LATER_FIELDS}
    payload = json.dumps([backend_name, body, settings, salt], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CachedBackend:
    """Wraps a backend; answers already in the cache are returned without a request."""

    def __init__(self, inner: Backend, path: Path, salt: str = "") -> None:
        self.inner = inner
        self.name = inner.name
        self.usage = inner.usage
        self.concurrency = inner.concurrency  # complete_many passes misses on, so the inner backend's parallelism holds
        self.in_process = False  # what a LocalBackend adds (its tokens, cancellable streams) is not passed through
        self.streaming = inner.streaming
        self.scoring = False
        self.own_chat_template = inner.own_chat_template
        self.parameters = inner.parameters
        self.salt = salt  # distinguishes repeated samples of the same request (e.g. judge repeats)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, text TEXT, finish TEXT, "
                         "prompt_tokens INT, completion_tokens INT)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
        if "model" not in columns:  # caches written before reported model ids were kept
            try:
                self._db.execute("ALTER TABLE responses ADD COLUMN model TEXT DEFAULT ''")
                self._db.commit()
            except sqlite3.OperationalError:  # another process added it between our check and our ALTER
                pass
        self._lock = threading.Lock()

    @property
    def repetition(self) -> Repetition:
        """The inner backend's decoding default (it applies it; cache keys include it)."""
        return self.inner.repetition

    @repetition.setter
    def repetition(self, value: Repetition) -> None:
        self.inner.repetition = value

    def _get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute("SELECT text, finish, prompt_tokens, completion_tokens, model FROM responses "
                                   "WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        return Completion(text=row[0], finish_reason=row[1], prompt_tokens=row[2], completion_tokens=row[3],
                          cached=True, model=row[4] or "")

    def _key(self, request: Request, params: GenParams) -> str:
        return request_key(self.name, request, with_repetition(self.inner, params), self.salt)

    def _put(self, key: str, completion: Completion) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses (key, text, finish, prompt_tokens, completion_tokens, "
                             "model) VALUES (?, ?, ?, ?, ?, ?)",
                             (key, completion.text, completion.finish_reason, completion.prompt_tokens,
                              completion.completion_tokens, completion.model))
            self._db.commit()

    def forget(self, request: Request, params: GenParams = GenParams()) -> None:
        """Drop a cached answer (e.g. one that failed validation, so a retry asks again)."""
        key = self._key(request, params)
        with self._lock:
            self._db.execute("DELETE FROM responses WHERE key=?", (key,))
            self._db.commit()

    def complete(self, request: Request, params: GenParams = GenParams()) -> Completion:
        """Cached answer, or ask the inner backend and remember the answer."""
        key = self._key(request, params)
        hit = self._get(key)
        if hit is not None:
            self.usage.cached += 1
            return hit
        completion = self.inner.complete(request, params)
        self._put(key, completion)
        return completion

    def stream(self, request: Request, params: GenParams = GenParams()) -> Iterator[str]:
        """Streams are never cached."""
        return self.inner.stream(request, params)

    def complete_many(self, batch: Sequence[Request], params: GenParams = GenParams()) -> Iterator[Result]:
        """Serve hits at once; send only the misses to the inner backend (keeping its concurrency)."""
        misses: list[int] = []
        keys = [self._key(r, params) for r in batch]
        for index, key in enumerate(keys):
            hit = self._get(key)
            if hit is None:
                misses.append(index)
            else:
                self.usage.cached += 1
                yield index, hit
        for sub_index, result in self.inner.complete_many([batch[i] for i in misses], params):
            index = misses[sub_index]
            if not isinstance(result, BackendError):
                self._put(keys[index], result)
            yield index, result

    def close(self) -> None:
        """Close the database and the inner backend."""
        self._db.close()
        self.inner.close()
