"""Loaded backends: opened on first use, shared by the ids with the same weights, the least recently used closed."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from persllm.backends.base import Backend, GenParams, LocalBackend
from persllm.config import Project
from persllm.serve.ids import ModelEntry
from persllm.types import Message
from persllm.variants import backend_key

log = logging.getLogger(__name__)

Opener = Callable[[Project, str], Backend]


class LoadedBackend:
    """A loaded backend, its users, and the lock that serialises in-process models."""

    def __init__(self, key: str, backend: Backend) -> None:
        self.key = key
        self.backend = backend
        self.users = 0
        self._local = cast(LocalBackend, backend) if backend.in_process else None
        # Local weights serve one request at a time anyway, and a transformers tokenizer is not safe to use from
        # several threads at once; HTTP and scripted backends take concurrent requests.
        self.serial = threading.Lock() if self._local is not None else None

    @property
    def local(self) -> bool:
        """True for in-process weights (transformers, llama.cpp): their context is known and checked here."""
        return self._local is not None

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the model for one request if it cannot take several at once."""
        if self.serial is None:
            yield
            return
        with self.serial:
            yield

    def count(self, text: str) -> int:
        """Tokens in `text` (the model's tokenizer when local, else whitespace words)."""
        return self._local.count_tokens(text) if self._local is not None else len(text.split())

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of the rendered prompt."""
        if self._local is not None:
            return int(self._local.prompt_tokens(list(messages)))
        return sum(self.count(m.content) for m in messages)

    def context(self, cap: int) -> int | None:
        """Prompt plus answer tokens a request may use: the model's own context, at most `cap`; None for endpoints
        (they check their own context, in their own tokens)."""
        if self._local is None:
            return None
        own = self._local.context_length
        return min(own, cap) if isinstance(own, int) and own > 0 else cap

    def stream(self, messages: Sequence[Message], params: GenParams, cancel: threading.Event) -> Iterator[str]:
        """The backend's stream of pieces. Closing it stops any backend; local models also check `cancel` after
        every token, because they may hold text back (a word, incomplete UTF-8) and a closed stream is only noticed
        at the next piece."""
        if self._local is not None:
            return self._local.stream(list(messages), params, cancel=cancel)
        return self.backend.stream(list(messages), params)


class ModelPool:
    """Backends loaded on first use; the `capacity` most recently used stay loaded, idle ones beyond are closed."""

    def __init__(self, opener: Opener, capacity: int = 2) -> None:
        self.opener = opener
        self.capacity = max(1, capacity)
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedBackend] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}

    def acquire(self, entry: ModelEntry) -> LoadedBackend:
        """The backend for an entry, loading it if needed (blocking; call from a worker thread)."""
        key = backend_key(entry.project, entry.variant)
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one load per key: concurrent first requests wait for it instead of loading twice
            with self._lock:
                loaded = self._loaded.get(key)
                if loaded is not None:
                    self._loaded.move_to_end(key)
                    loaded.users += 1
                    return loaded
            log.info("loading %s for %s", entry.variant, entry.id)
            loaded = LoadedBackend(key, self.opener(entry.project, entry.variant))
            with self._lock:
                loaded.users = 1
                self._loaded[key] = loaded
                idle = self._evict()
        for victim in idle:
            victim.backend.close()
        return loaded

    def release(self, loaded: LoadedBackend) -> None:
        """Done with a backend; close idle ones beyond capacity."""
        with self._lock:
            loaded.users -= 1
            idle = self._evict()
        for victim in idle:
            victim.backend.close()

    def loaded(self) -> list[str]:
        """Keys of the loaded backends, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def close(self) -> None:
        """Close every backend."""
        with self._lock:
            victims = list(self._loaded.values())
            self._loaded.clear()
        for victim in victims:
            victim.backend.close()

    def _evict(self) -> list[LoadedBackend]:
        victims: list[LoadedBackend] = []
        for key in list(self._loaded):
            if len(self._loaded) - len(victims) <= self.capacity:
                break
            if self._loaded[key].users == 0:
                victims.append(self._loaded[key])
        for victim in victims:
            del self._loaded[victim.key]
        return victims
