"""The backend contract: chat messages in, text (or a stream) out, plus many requests at once."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar, runtime_checkable

from persllm.decoding import Repetition, override
from persllm.errors import BackendError
from persllm.types import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenParams:
    """Sampling settings for one request."""

    temperature: float = 0.7
    max_tokens: int = 512
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None  # None: the backend's decoding default (persllm.decoding)
    no_repeat_ngram: int | None = None  # None: the backend's decoding default


def request_repetition(backend: Backend, params: GenParams) -> Repetition:
    """The anti-repetition settings a backend applies to a request: its own default, overridden by the request."""
    return override(backend.repetition, params.repetition_penalty, params.no_repeat_ngram)


def with_repetition(backend: Backend, params: GenParams) -> GenParams:
    """`params` with the backend's decoding made explicit when it changes anything (cache keys must see it)."""
    repetition = request_repetition(backend, params)
    if not repetition.active:
        return params
    return replace(params, repetition_penalty=repetition.repetition_penalty, no_repeat_ngram=repetition.no_repeat_ngram)


@dataclass(frozen=True)
class Completion:
    """One generated answer with its accounting."""

    text: str
    finish_reason: str = "stop"  # "stop", or "length" when cut off by max_tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    model: str = ""  # the model id the server reported (OpenAI `model` field; the GGUF file name for llama.cpp)


@dataclass
class Usage:
    """Running totals for a backend, reported in stage stats."""

    requests: int = 0
    cached: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    by_error: dict[str, int] = field(default_factory=dict)

    def add(self, completion: Completion, seconds: float = 0.0) -> None:
        """Count one finished request."""
        if completion.cached:
            self.cached += 1
            return
        self.requests += 1
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        self.seconds += seconds

    def as_dict(self) -> dict[str, object]:
        """Plain dict for stats files."""
        return {"requests": self.requests, "cached": self.cached, "failures": self.failures, "retries": self.retries,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "seconds": round(self.seconds, 2), "errors": dict(self.by_error)}


Request = Sequence[Message] | str  # chat messages, or a raw text prompt that a base model continues
Result = tuple[int, Completion | BackendError]


@runtime_checkable
class Backend(Protocol):
    """Anything that turns chat messages (or a raw prompt) into text; its capabilities are attributes, so callers
    ask the backend what it can do instead of testing its class."""

    name: str
    usage: Usage
    concurrency: int
    """Requests it serves at once; callers with many requests of their own run this many threads."""
    in_process: bool
    """Weights loaded in this process: it is a LocalBackend (its own tokens and context, a stream that can be
    cancelled) and serves one request at a time."""
    streaming: bool
    """`stream` yields pieces as they are generated (False: the whole answer is made first, then handed out)."""
    scoring: bool
    """Log-likelihoods of given continuations (`score`, `option_logprobs`): IPIP by likelihood, held-out perplexity."""
    own_chat_template: bool
    """Chat requests go through the model's own chat template (False: a base model given persllm's, which it never
    saw in training; eval prompts such a model few-shot instead)."""
    parameters: int | None
    """The model's size when known (it picks small-model decoding defaults); None for endpoints."""
    repetition: Repetition
    """The anti-repetition decoding applied to answers unless a request says otherwise (persllm.variants sets it
    per model size; endpoints pass the penalty on where the server accepts it)."""

    def complete(self, request: Request, params: GenParams = GenParams()) -> Completion:
        """Generate one answer."""
        ...

    def stream(self, request: Request, params: GenParams = GenParams()) -> Iterator[str]:
        """Generate one answer piece by piece; closing the iterator stops generation (a generator may return its
        Completion, for the token counts)."""
        ...

    def complete_many(self, batch: Sequence[Request], params: GenParams = GenParams()) -> Iterator[Result]:
        """Generate answers for many requests, yielding (index, Completion or BackendError) as each finishes."""
        ...

    def close(self) -> None:
        """Release processes, files and sockets."""
        ...


class LocalBackend(Backend, Protocol):
    """A backend whose weights are in this process (`in_process` is True): what a server needs to bound its work."""

    context_length: int | None
    """Prompt plus answer tokens the model was built for (None if it does not say)."""

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the model's vocabulary."""
        ...

    def prompt_tokens(self, request: Request) -> int:
        """Tokens of the prompt as the model sees it."""
        ...

    def stream(self, request: Request, params: GenParams = GenParams(),
               cancel: threading.Event | None = None) -> Iterator[str]:
        """As Backend.stream; setting `cancel` also ends the answer at the next token (a closed stream is only
        noticed at the next piece, and a local model may hold text back)."""
        ...


def sequential_many(backend: Backend, batch: Sequence[Request], params: GenParams) -> Iterator[Result]:
    """complete_many for backends that serve one request at a time (in-process models)."""
    for index, request in enumerate(batch):
        try:
            yield index, backend.complete(request, params)
        except BackendError as exc:
            yield index, exc


T = TypeVar("T")


def with_retries(call: Callable[[], T], *, what: str, max_retries: int, usage: Usage | None = None,
                 base_delay: float = 1.0, max_delay: float = 60.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `call`, retrying retryable BackendErrors with exponential backoff and jitter (honouring Retry-After)."""
    attempt = 0
    while True:
        try:
            return call()
        except BackendError as exc:
            if not exc.retryable or attempt >= max_retries:
                if usage is not None:
                    usage.failures += 1
                    key = str(exc).split(":", 1)[0][:40]
                    usage.by_error[key] = usage.by_error.get(key, 0) + 1
                if exc.retryable:
                    raise BackendError(f"{exc} (gave up after {attempt + 1} attempts)", retryable=False) from exc
                raise
            delay = exc.retry_after if exc.retry_after is not None else min(max_delay, base_delay * 2**attempt)
            delay = min(max_delay, delay) * (1.0 + 0.25 * random.random())
            attempt += 1
            if usage is not None:
                usage.retries += 1
            log.info("%s: %s; retry %d/%d in %.1fs", what, exc, attempt, max_retries, delay)
            sleep(delay)
