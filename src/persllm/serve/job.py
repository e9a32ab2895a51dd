"""One generation on its own worker thread: the prompt fitted to the context, the visible answer, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request

from persllm.backends.base import Completion, GenParams
from persllm.serve.errors import ApiError, api_error
from persllm.serve.gate import Gate, in_thread
from persllm.serve.parse import Call, Limits
from persllm.serve.pool import LoadedBackend, ModelPool


class StopCutter:
    """Cuts a stream at the first stop string, holding back text that could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text that is safe to emit now."""
        if self.stopped:
            return ""
        self.buffer += piece
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[:min(hits)], ""
            return out
        cut = max(0, len(self.buffer) - self.keep)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def finish(self) -> str:
        """The held-back tail once the stream has ended."""
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


class Visible:
    """What the client sees of the model's output: the answer without its analysis (unless shown), cut at the first
    client stop string found in that answer, so a stop such as "\n" never matches inside the hidden analysis."""

    def __init__(self, stops: Sequence[str], show_analysis: bool) -> None:
        from persllm.chat import AnswerFilter

        self._answer, self._cutter = AnswerFilter(show_analysis), StopCutter(stops)

    @property
    def stopped(self) -> bool:
        """True once a stop string was found in the visible answer."""
        return self._cutter.stopped

    def feed(self, piece: str) -> str:
        """Visible text that is safe to send now."""
        return self._cutter.feed(self._answer.feed(piece))

    def finish(self) -> str:
        """The held-back rest once the output has ended."""
        tail = self._cutter.feed(self._answer.finish())
        return tail + self._cutter.finish()


READY, END = object(), object()


@dataclass(frozen=True)
class Outcome:
    """The accounting of a finished generation."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (the model ended, or a client stop string in the answer) or "length"


class Job:
    """One generation on its own worker thread, which keeps its gate slot until the model has really stopped.

    The worker loads the model and checks the prompt against its context first; `queue` then gets READY (or END
    at once when that failed: `done` holds the error), the visible text piece by piece, and END. Setting `cancel`
    (the client left, the time is up) stops the model within a token or two.
    """

    def __init__(self, call: Call, pool: ModelPool, gate: Gate, limits: Limits) -> None:
        self.call = call
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancel = threading.Event()
        self.timeout = limits.timeout
        self.deadline = time.monotonic() + limits.timeout
        self._loop = asyncio.get_running_loop()
        self._left = asyncio.Event()
        self.done: asyncio.Future[Outcome] = in_thread(gate, lambda: self._work(pool, limits.max_context))

    def left(self) -> float:
        """Seconds until the deadline."""
        return max(0.0, self.deadline - time.monotonic())

    def watch(self, request: Request) -> None:
        """Cancel the job as soon as the client disconnects, for as long as it runs (streams included: also before
        their first event, where no response code would notice)."""
        watcher = asyncio.ensure_future(disconnected(request))
        watcher.add_done_callback(lambda task: None if task.cancelled() else self._client_left())
        self.done.add_done_callback(lambda _: watcher.cancel())

    async def wait(self, work: asyncio.Future[Any]) -> Any:
        """The result of `work`, unless the client leaves or the deadline passes first: then the job is cancelled
        (its model stops within a token or two) and an error raised."""
        left = asyncio.ensure_future(self._left.wait())
        try:
            await asyncio.wait({work, left}, timeout=self.left(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
        if work.done():
            try:
                return work.result()
            except Exception as exc:  # noqa: BLE001 (every failure becomes an OpenAI-shaped error response)
                raise api_error(exc) from None
        self.cancel.set()
        if isinstance(work, asyncio.Task):
            work.cancel()  # job.ready(), still waiting; the worker's own future settles when its thread ends
        if self._left.is_set():
            raise ApiError(499, "the client disconnected", code="client_disconnected")
        raise ApiError(504, f"generation took longer than {self.timeout:.0f}s", kind="server_error", code="timeout")

    def _client_left(self) -> None:
        self.cancel.set()
        self._left.set()

    async def ready(self) -> None:
        """Wait until generation starts; raise the worker's error (a prompt too long, a model that fails to load)."""
        first = await self.queue.get()
        if first is END:
            try:
                await self.done
            except Exception as exc:  # noqa: BLE001 (every failure becomes an OpenAI-shaped error response)
                raise api_error(exc) from None
            raise ApiError(500, "the generation ended before it started", kind="server_error")

    def _emit(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server has shut down
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _work(self, pool: ModelPool, max_context: int) -> Outcome:
        try:
            loaded = pool.acquire(self.call.entry)
            try:
                with loaded.turn():
                    params, prompt_tokens = fit_context(loaded, self.call, max_context)
                    self._emit(READY)
                    return generate(loaded, self.call, params, prompt_tokens, self._emit, self.cancel, self.deadline)
            finally:
                pool.release(loaded)
        finally:
            self._emit(END)


def fit_context(loaded: LoadedBackend, call: Call, max_context: int) -> tuple[GenParams, int]:
    """The request's settings with max_tokens shortened to the context left after the prompt, and the prompt's
    tokens; a prompt, or a max_tokens the client chose, that does not fit is OpenAI's context_length_exceeded."""
    prompt = loaded.prompt_tokens(call.messages)
    window = loaded.context(max_context)
    if window is None:
        return call.params, prompt
    room, asked = window - prompt, call.params.max_tokens
    if room >= 1 and (asked <= room or not call.max_tokens_set):
        return replace(call.params, max_tokens=min(asked, room)), prompt
    what = (f"your messages resulted in {prompt} tokens. Please reduce the length of the messages" if room < 1 else
            f"you requested {prompt + asked} tokens ({prompt} in the messages, {asked} in the completion). Please "
            "reduce the length of the messages or the completion (max_tokens)")
    raise ApiError(400, f"This model's maximum context length is {window} tokens. However, {what}.",
                   code="context_length_exceeded", param="messages")


def generate(loaded: LoadedBackend, call: Call, params: GenParams, prompt_tokens: int, emit: Callable[[Any], None],
             cancel: threading.Event, deadline: float) -> Outcome:
    """Run the model, handing the visible text to `emit` as it comes, until it ends, a client stop string appears
    in the visible answer, `cancel` is set, or the deadline passes."""
    visible = Visible(params.stop, call.show_analysis)
    plain = replace(params, stop=())  # stops are matched here on the visible answer, not by the backend
    done: Completion | None = None
    if call.stream or loaded.local:
        # Local models stream whole answers too: a stop string in the answer then ends generation at once.
        raw, done = _pump(loaded.stream(call.messages, plain, cancel), visible, emit, cancel, deadline)
    else:
        done = loaded.backend.complete(list(call.messages), plain)
        raw = done.text
        if text := visible.feed(raw):
            emit(text)
    if tail := visible.finish():
        emit(tail)
    if done is not None and done.completion_tokens:
        completion_tokens = done.completion_tokens
    else:  # streams yield text, not tokens: re-tokenized (bytes that decode to U+FFFD can grow, hence the cap)
        completion_tokens = min(loaded.count(raw), params.max_tokens)
    if visible.stopped:
        finish = "stop"
    elif done is not None and done.finish_reason:
        finish = done.finish_reason
    else:
        finish = "stop" if completion_tokens < params.max_tokens else "length"
    if done is not None and done.prompt_tokens:
        prompt_tokens = done.prompt_tokens  # the backend's own count (an endpoint's, in its tokens)
    return Outcome(prompt_tokens, completion_tokens, finish)


def _pump(pieces: Iterator[str], visible: Visible, emit: Callable[[Any], None], cancel: threading.Event,
          deadline: float) -> tuple[str, Completion | None]:
    """Feed the stream's pieces through `visible` to `emit` until it ends (returning the backend's Completion, if it
    gives one), the visible answer hits a stop string, the client leaves, or time runs out; the raw text too."""
    raw: list[str] = []
    done = None
    try:
        while not cancel.is_set() and time.monotonic() < deadline:
            try:
                piece = next(pieces)
            except StopIteration as end:
                done = end.value if isinstance(end.value, Completion) else None
                break
            raw.append(piece)
            if text := visible.feed(piece):
                emit(text)
            if visible.stopped:
                break
    finally:
        if isinstance(pieces, Generator):
            pieces.close()  # a local model stops generating here (and returns only once it has)
    return "".join(raw), done


async def disconnected(request: Request) -> None:
    """Return once the client has closed the connection (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
