"""A scripted backend for tests and dry runs: deterministic, records every request."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from persllm.backends.base import Completion, GenParams, Request, Result, Usage, sequential_many
from persllm.decoding import Repetition
from persllm.errors import BackendError

if TYPE_CHECKING:
    from persllm.backends.registry import OpenOptions
    from persllm.config import ModelSpec

Reply = str | Completion | BackendError
Script = Sequence[Reply] | Callable[[Request], Reply]


class FakeBackend:
    """Answers from a list (in order, cycling) or a function of the request; raises scripted BackendErrors."""

    concurrency = 1
    in_process = False
    streaming = False  # the scripted reply is made whole, then handed out word by word
    scoring = False
    own_chat_template = True
    parameters: int | None = None

    def __init__(self, replies: Script = ("[Analysis] ok\n[Response] ok",), name: str = "fake") -> None:
        self.name = name
        self.usage = Usage()
        self.repetition = Repetition()
        self.calls: list[Request] = []
        self._replies = replies
        self._lock = threading.Lock()

    def complete(self, request: Request, params: GenParams = GenParams()) -> Completion:
        """Return the next scripted reply."""
        with self._lock:
            index = len(self.calls)
            self.calls.append(request)
        reply = self._replies(request) if callable(self._replies) else self._replies[index % len(self._replies)]
        if isinstance(reply, BackendError):
            self.usage.failures += 1
            raise reply
        completion = reply if isinstance(reply, Completion) else Completion(
            text=reply, prompt_tokens=_words(request), completion_tokens=len(reply.split()))
        with self._lock:
            self.usage.add(completion)
        return completion

    def stream(self, request: Request, params: GenParams = GenParams()) -> Iterator[str]:
        """Yield the scripted reply word by word."""
        text = self.complete(request, params).text
        for i, word in enumerate(text.split(" ")):
            yield word if i == 0 else " " + word

    def complete_many(self, batch: Sequence[Request], params: GenParams = GenParams()) -> Iterator[Result]:
        """Sequential, in order."""
        return sequential_many(self, batch, params)

    def close(self) -> None:
        """Nothing to release."""


def _words(request: Request) -> int:
    if isinstance(request, str):
        return len(request.split())
    return sum(len(m.content.split()) for m in request)


def from_spec(spec: ModelSpec, options: OpenOptions) -> FakeBackend:
    """`fake`: the default script (BACKENDS row)."""
    return FakeBackend()
