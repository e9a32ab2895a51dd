"""An OpenAI-compatible server for personas: /v1/models, /v1/chat/completions (streaming or not) and /health.

Model ids are `<persona-slug>@<stage-id>:<variant>` (variant base, sft, dpo, or a backend spec) plus
`<persona-slug>@<stage-id>` for the best variant served (dpo > sft > base). Every request is rendered with
template.prompt_messages, so a tuned model sees exactly its training prompt. A client's system (or developer) message
is ignored: the persona prompt is owned by persllm, and the generic "You are a helpful assistant" that many clients
send would pull a tuned model out of character. The chain of thought ([Analysis]) is removed from the answer unless
the request sets `show_analysis: true` (openai client: `extra_body={"show_analysis": True}`).

Concurrency: at most `max_concurrency` generations run at once, `max_queue` more wait, and beyond that requests get
503 with Retry-After. In-process models (transformers, llama.cpp) additionally run one request at a time, since their
weights and tokenizer are shared. Backends are loaded on first use and the `max_loaded` most recently used stay
loaded; stages and personas that share weights share one loaded backend.

Bounded work per request: stop strings are few and short and matched on the visible answer (never inside the hidden
analysis, and never by the backend); a local model's prompt is counted in its tokens against its context (capped by
`max_context`), and what does not fit is OpenAI's 400 context_length_exceeded; a client that disconnects, or a
request that times out, stops its model within a token or two, and keeps its slot (and /health's `running`) until the
model has stopped. Unsupported OpenAI fields (tools, logprobs, response formats, n > 1) get a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from starlette.requests import Request

from persllm import template, variants
from persllm.backends.base import Backend, Completion, GenParams
from persllm.config import Project
from persllm.errors import BackendError, ConfigError, PersllmError
from persllm.types import Message
from persllm.workspace import Workspace

log = logging.getLogger(__name__)

KEYS_ENV = "PERSLLM_API_KEYS"
HISTORY_TURNS = 8  # earlier exchanges kept in the prompt; older ones are dropped so prompts fit small context windows
_RANK = {"dpo": 3, "sft": 2, "base": 1}  # "best variant" order; endpoint specs rank below the persona's own models

Opener = Callable[[Project, str], Backend]


class PortInUseError(PersllmError):
    """The address to listen on is taken."""


@dataclass(frozen=True)
class Served:
    """A project to serve, optionally narrowed to one stage and/or one variant."""

    project: Project
    stage: str | None = None
    variant: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One id of /v1/models: a persona at a stage through one variant."""

    id: str
    project: Project
    stage: str
    variant: str


# -- model ids --------------------------------------------------------------------------------------------------
def model_entries(projects: Sequence[Project | Served]) -> dict[str, ModelEntry]:
    """Every model id the projects offer; unknown stages and missing adapters raise ConfigError now."""
    chosen: dict[tuple[str, str], list[str]] = {}
    owners: dict[str, Project] = {}
    for item in projects:
        sel = item if isinstance(item, Served) else Served(item)
        project = sel.project
        other = owners.setdefault(project.slug, project)
        if other.root != project.root:
            raise ConfigError(f"{other.root} and {project.root} are both persona {project.slug!r}; "
                              "serve one of them, or rename a persona")
        stages = [project.stage(sel.stage).id] if sel.stage else [s.id for s in project.stages]
        names = [sel.variant] if sel.variant else variants.available(project)
        for name in names:
            check_variant(project, name)
        for stage in stages:
            served = chosen.setdefault((project.slug, stage), [])
            served.extend(n for n in names if n not in served)
    entries: dict[str, ModelEntry] = {}
    for (slug, stage), names in chosen.items():
        for name in names:
            entries[f"{slug}@{stage}:{name}"] = ModelEntry(f"{slug}@{stage}:{name}", owners[slug], stage, name)
        best = max(names, key=lambda n: _RANK.get(n, 0))
        entries[f"{slug}@{stage}"] = ModelEntry(f"{slug}@{stage}", owners[slug], stage, best)  # the best variant
    return entries


def check_variant(project: Project, variant: str) -> None:
    """Raise the usual ConfigError for a missing adapter or an unknown model, without loading anything."""
    if variant in variants.TUNED and variant not in variants.available(project):
        variants.spec_for(project, variant)  # raises "no DPO adapter at ...; run `persllm train` first"
    elif variant != "base" and variant not in variants.TUNED:
        variants.spec_for(project, variant)  # parses endpoint specs; unknown names raise


def backend_key(project: Project, variant: str) -> str:
    """Identity of the weights behind a variant: stages and personas with the same key share one backend."""
    if variant == "base":
        return f"base:{project.base_model.spec}"
    if variant in variants.TUNED:
        return f"{variant}:{project.base_model.spec}+{Workspace.of(project).adapter_dir(variant)}"
    return f"spec:{variant}"


# -- loaded backends ----------------------------------------------------------------------------------------------
class Loaded:
    """A loaded backend, its users, and the lock that serialises in-process models."""

    def __init__(self, key: str, backend: Backend) -> None:
        from persllm.backends.hf import HFBackend
        from persllm.backends.llamacpp import LlamaCpp

        self.key = key
        self.backend = backend
        self.users = 0
        self._hf, self._llama = isinstance(backend, HFBackend), isinstance(backend, LlamaCpp)
        # Local weights serve one request at a time anyway, and a transformers tokenizer is not safe to use from
        # several threads at once; HTTP and scripted backends take concurrent requests.
        self.serial = threading.Lock() if self._hf or self._llama else None
        self._count: Callable[[str], int] = lambda text: len(text.split())
        if self._hf:
            self._count = _token_counter(backend.tokenizer)  # type: ignore[attr-defined]
        elif self._llama:
            self._count = backend.count_tokens  # type: ignore[attr-defined]

    @property
    def local(self) -> bool:
        """True for in-process weights (transformers, llama.cpp): their context is known and checked here."""
        return self.serial is not None

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
        return self._count(text)

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of the rendered prompt."""
        if self._hf:
            return self.count(self.backend.render(messages))  # type: ignore[attr-defined]
        if self._llama:
            return int(self.backend.prompt_tokens(list(messages)))  # type: ignore[attr-defined]
        return sum(self.count(m.content) for m in messages)

    def context(self, cap: int) -> int | None:
        """Prompt plus answer tokens a request may use: the model's own context, at most `cap`; None for endpoints
        (they check their own context, in their own tokens)."""
        if not self.local:
            return None
        own = getattr(self.backend, "context_length", None)
        return min(own, cap) if isinstance(own, int) and own > 0 else cap

    def stream(self, messages: Sequence[Message], params: GenParams, cancel: threading.Event) -> Iterator[str]:
        """The backend's stream of pieces. Closing it stops any backend; local models also check `cancel` after
        every token, because they may hold text back (a word, incomplete UTF-8) and a closed stream is only noticed
        at the next piece."""
        if self.local:
            return self.backend.stream(list(messages), params, cancel=cancel)  # type: ignore[call-arg]
        return self.backend.stream(list(messages), params)


def _token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Token counts from a transformers tokenizer; fast ones through the Rust tokenizer directly, because the
    wrapper's __call__ re-configures padding (a mutation that fails while a streamer decodes on another thread)."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerFast):
        rust = tokenizer.backend_tokenizer
        return lambda text: len(rust.encode(text, add_special_tokens=False).ids)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


class ModelPool:
    """Backends loaded on first use; the `capacity` most recently used stay loaded, idle ones beyond are closed."""

    def __init__(self, opener: Opener, capacity: int = 2) -> None:
        self.opener = opener
        self.capacity = max(1, capacity)
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}

    def acquire(self, entry: ModelEntry) -> Loaded:
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
            loaded = Loaded(key, self.opener(entry.project, entry.variant))
            with self._lock:
                loaded.users = 1
                self._loaded[key] = loaded
                idle = self._evict()
        for victim in idle:
            victim.backend.close()
        return loaded

    def release(self, loaded: Loaded) -> None:
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

    def _evict(self) -> list[Loaded]:
        victims: list[Loaded] = []
        for key in list(self._loaded):
            if len(self._loaded) - len(victims) <= self.capacity:
                break
            if self._loaded[key].users == 0:
                victims.append(self._loaded[key])
        for victim in victims:
            del self._loaded[victim.key]
        return victims


# -- admission: bounded concurrency with a bounded queue ------------------------------------------------------------
class Busy(Exception):
    """The queue is full."""


class Gate:
    """At most `slots` requests generate at once and `queue` more wait; beyond that, Busy."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots, self.queue = max(1, slots), max(0, queue)
        self.running = 0
        self.waiting = 0
        self._free: asyncio.Semaphore | None = None

    async def enter(self) -> None:
        """Wait for a slot, or raise Busy when the queue is already full."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.slots)
        if self.running + self.waiting >= self.slots + self.queue:
            raise Busy
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def leave(self) -> None:
        """Give the slot back (on the event loop)."""
        self.running -= 1
        assert self._free is not None
        self._free.release()


def _in_thread(gate: Gate, work: Callable[[], Any]) -> asyncio.Future[Any]:
    """Run `work` on its own thread; the slot is released when the thread ends, even if the client left earlier."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (work(), None)
        except BaseException as exc:  # noqa: BLE001 (handed to the awaiting request, which reports it)
            outcome = (None, exc)

        def settle() -> None:
            gate.leave()
            if not future.done():
                if outcome[1] is not None:
                    future.set_exception(outcome[1])
                else:
                    future.set_result(outcome[0])

        with contextlib.suppress(RuntimeError):  # the loop is gone: the server has shut down
            loop.call_soon_threadsafe(settle)

    threading.Thread(target=run, name="persllm-serve", daemon=True).start()
    return future


# -- requests -------------------------------------------------------------------------------------------------------
def persona_messages(entry: ModelEntry, messages: Sequence[dict[str, Any]]) -> list[Message]:
    """The client's conversation in the training prompt format of the entry's persona and stage."""
    turns: list[Message] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            continue  # the persona prompt is persllm's own (see the module docstring)
        if role not in ("user", "assistant"):
            raise ValueError(f"messages with role {role!r} are not supported; send user and assistant turns")
        text = _text(message.get("content"))
        if role == "assistant":
            text = template.visible_answer(text)  # history without analysis, as in `persllm chat`
        if turns and turns[-1].role == role:
            turns[-1] = Message(role, f"{turns[-1].content}\n\n{text}")
        else:
            turns.append(Message(role, text))
    if not turns or turns[-1].role != "user":
        raise ValueError("the last message must come from the user")
    history = turns[:-1][-2 * HISTORY_TURNS:]
    if history and history[0].role == "assistant":
        history = history[1:]
    return template.prompt_messages(template.context_for(entry.project, entry.stage), turns[-1].content, history)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("message content must be a string or a list of text parts")
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError("only text content is supported")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


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


# -- keys, sockets and the server ---------------------------------------------------------------------------------
def load_api_keys(path: Path | None = None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Keys from a file (one per line, # comments) and from $PERSLLM_API_KEYS (comma-separated)."""
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in env.get(KEYS_ENV, "").split(",") if k.strip()]
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"API key file {path} not found; create it with one key per line")
        found = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise ConfigError(f"API key file {path} holds no keys; add one key per line")
        keys += found
    return tuple(dict.fromkeys(keys))


def key_ok(keys: Sequence[str], authorization: str | None) -> bool:
    """True when no keys are configured or the bearer token matches one (constant-time, no early exit)."""
    if not keys:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(key.encode(), given)
    return ok and bool(given)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or PortInUseError; bound before any model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise PersllmError(f"cannot listen on {host!r}: {exc.strerror}; use --host 127.0.0.1 or 0.0.0.0") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise PortInUseError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); the port is in use: stop the "
                             "other server or pick another with --port") from exc
    sock.set_inheritable(True)
    return sock


def run_server(app: Any, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on an already bound socket until interrupted."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, access_log=log_level == "debug")
    uvicorn.Server(config).run(sockets=[sock])


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` on a background thread (tests, notebooks); yields the base URL, stops on exit."""
    import uvicorn

    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise PersllmError(f"the server on {host}:{sock.getsockname()[1]} did not start")
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# -- the app --------------------------------------------------------------------------------------------------------
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 128  # per stop string: matched on the text, so the cost is bounded by this, not by the vocabulary
MAX_DEPTH = 32  # nesting of a request body (a chat request needs 5); deeper JSON is refused before it is walked
# Fields of OpenAI's API that persllm does not implement -> the values that mean "not used" (sent by some clients).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "logprobs": (False,), "top_logprobs": (0,), "audio": (),
    "modalities": (["text"],), "prediction": (),
}
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Limits:
    """Admission and size limits of the server."""

    max_concurrency: int = 4
    max_queue: int = 32
    timeout: float = 300.0  # seconds a request may take once it has a slot (loading the model included)
    max_body: int = 1 << 20  # bytes of a request body
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    default_max_tokens: int = 512
    max_context: int = 8192  # prompt plus answer tokens on a local model, at most its own (memory grows with it)


@dataclass(frozen=True)
class Call:
    """One validated chat completion request."""

    entry: ModelEntry
    messages: tuple[Message, ...]
    params: GenParams
    stream: bool
    show_analysis: bool
    include_usage: bool
    id: str
    created: int
    max_tokens_set: bool = False  # the client chose max_tokens (else the default, shortened to fit the context)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param, self.headers = status, kind, code, param, headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def create_app(projects: Sequence[Project | Served], api_keys: Sequence[str] = (), limits: Limits = Limits(),
               max_loaded: int = 2, opener: Opener | None = None) -> Any:
    """The FastAPI app serving the projects' personas (ids, prompts and limits: see the module docstring).

    Args:
        opener: builds a backend for (project, variant); default variants.open_variant (tests pass fakes).
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    entries = model_entries(projects)
    pool = ModelPool(opener or variants.open_variant, max_loaded)
    gate = Gate(limits.max_concurrency, limits.max_queue)
    keys = tuple(api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        pool.close()

    app = FastAPI(title="persllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool, app.state.gate, app.state.entries = pool, gate, entries

    @app.exception_handler(ApiError)
    async def api_error(_: Any, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error(request, _http_error(request, exc))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:  # a bug: still answered in OpenAI's shape
        return await api_error(request, ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    _routes(app, entries, keys, limits, pool, gate)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body)
    return app


def _http_error(request: Request, exc: Any) -> ApiError:
    """Starlette's own errors (no such route, wrong method) as OpenAI-shaped ones."""
    where = f"{request.method} {request.url.path[:200]}"
    if exc.status_code == 404:
        return ApiError(404, f"no endpoint {where}; persllm serve offers GET /v1/models, GET /v1/models/ID, "
                        "POST /v1/chat/completions and GET /health", code="not_found")
    if exc.status_code == 405:
        return ApiError(405, f"{where} is not allowed; /v1/chat/completions takes POST, the others GET",
                        code="method_not_allowed", headers=dict(exc.headers or {}))
    return ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


def _routes(app: Any, entries: dict[str, ModelEntry], keys: tuple[str, ...], limits: Limits, pool: ModelPool,
            gate: Gate) -> None:
    from fastapi.responses import StreamingResponse

    created = int(time.time())
    ids_of: dict[str, list[str]] = {}  # backend key -> model ids it answers (/health shows ids, never file paths)
    for entry in entries.values():
        ids_of.setdefault(backend_key(entry.project, entry.variant), []).append(entry.id)

    def auth(request: Request) -> None:
        if not key_ok(keys, request.headers.get("authorization")):
            raise ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer KEY' with a key "
                           f"from the server's key file or ${KEYS_ENV}", code="invalid_api_key")

    async def health() -> dict[str, Any]:
        loaded = [i for key in pool.loaded() for i in ids_of.get(key, [])]
        # `running` counts generations until the model has stopped, also those whose client already left.
        return {"status": "ok", "models": len(entries), "loaded": loaded, "running": gate.running,
                "waiting": gate.waiting, "max_concurrency": gate.slots, "max_queue": gate.queue}

    async def list_models(request: Request) -> dict[str, Any]:
        auth(request)
        return {"object": "list", "data": [_model_card(e, created) for e in entries.values()]}

    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        auth(request)
        return _model_card(_entry(entries, model_id), created)

    async def chat(request: Request) -> Any:
        auth(request)
        call = parse_call(await _json(request), entries, limits)
        try:
            await gate.enter()
        except Busy:
            raise ApiError(503, f"the server is busy ({gate.running} running, {gate.waiting} queued); retry shortly",
                           kind="server_error", code="overloaded", headers={"Retry-After": "1"}) from None
        job = Job(call, pool, gate, limits)
        job.watch(request)
        if not call.stream:
            return await complete(job)
        # The status goes out with the first byte, so the stream starts only once the prompt has been checked.
        await job.wait(asyncio.ensure_future(job.ready()))
        return StreamingResponse(_events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])


def _model_card(entry: ModelEntry, created: int) -> dict[str, Any]:
    return {"id": entry.id, "object": "model", "created": created, "owned_by": "persllm",
            "persona": entry.project.name, "stage": entry.stage, "variant": entry.variant,
            "label": entry.project.stage(entry.stage).label}


def _entry(entries: dict[str, ModelEntry], model: Any) -> ModelEntry:
    if not isinstance(model, str) or model not in entries:
        raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists the ids "
                       "(persona@stage:variant, or persona@stage for the best variant)", code="model_not_found",
                       param="model")
    return entries[model]


async def _json(request: Any) -> Any:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise ApiError(400, "the request body is not valid JSON (or is nested too deeply)") from None
    check_body(body)
    return body


def check_body(body: Any) -> None:
    """Refuse JSON nested deeper than MAX_DEPTH and text with lone surrogates (JSON escapes allow them, but neither
    UTF-8 nor a tokenizer takes them); walked without recursion."""
    stack: list[tuple[Any, int, str | None]] = [(body, 0, None)]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"the request body is nested more than {MAX_DEPTH} levels deep", param=field)
        if isinstance(value, str) and _SURROGATE.search(value):
            raise ApiError(400, "the request holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is "
                           "not valid Unicode; send well-formed UTF-8 text", param=field)
        if isinstance(value, dict):
            for key, item in value.items():
                stack += [(key, depth + 1, field or key), (item, depth + 1, field or key)]
        elif isinstance(value, list):
            stack += [(item, depth + 1, field) for item in value]


def parse_call(body: Any, entries: dict[str, ModelEntry], limits: Limits) -> Call:
    """Validate a /v1/chat/completions body; problems become 400/404 ApiErrors naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    entry = _entry(entries, body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise ApiError(400, "n must be 1: persllm serve generates one choice per request; send several requests "
                       "instead", param="n")
    for field, unused in UNSUPPORTED.items():
        if body.get(field) is not None and body[field] not in unused:
            raise ApiError(400, f"{field} is not supported: persllm serve answers in plain text, without tools, "
                           f"logprobs, audio or structured output; remove {field} from the request", param=field)
    try:
        prompt = persona_messages(entry, messages)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    flags = {k: False if body.get(k) is None else body[k] for k in ("stream", "show_analysis")}
    options = body.get("stream_options") or {}
    if any(not isinstance(v, bool) for v in flags.values()) or not isinstance(options, dict):
        raise ApiError(400, "stream and show_analysis must be true or false; stream_options an object")
    chosen = any(body.get(k) is not None for k in ("max_tokens", "max_completion_tokens"))
    return Call(entry, tuple(prompt), _params(body, limits), flags["stream"], flags["show_analysis"],
                options.get("include_usage") is True, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), chosen)


def _params(body: dict[str, Any], limits: Limits) -> GenParams:
    def number(name: str, default: float | None, low: float, high: float, low_open: bool = False) -> float | None:
        value = body.get(name)
        if value is None:
            return default
        if (isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high
                or (low_open and value == low)):
            span = f"greater than {low} and at most {high}" if low_open else f"from {low} to {high}"
            raise ApiError(400, f"{name} must be a number {span}", param=name)
        return float(value)

    # max_completion_tokens is the newer name; 0 is refused (OpenAI: at least 1), not replaced by the default.
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"{name} must be an integer from 1 to {limits.max_tokens}", param=name)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} "
                       "characters", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise ApiError(400, "seed must be an integer from -2^63 to 2^63-1 (a 64-bit integer)", param="seed")
    ngram = body.get("no_repeat_ngram_size")  # transformers' name; repetition_penalty is vLLM's and llama.cpp's
    if ngram is not None and (isinstance(ngram, bool) or not isinstance(ngram, int) or not 0 <= ngram <= 16):
        raise ApiError(400, "no_repeat_ngram_size must be an integer from 0 (off) to 16", param="no_repeat_ngram_size")
    top_p = number("top_p", 1.0, 0.0, 1.0, low_open=True)  # 0 would keep no token; temperature 0 is greedy
    return GenParams(temperature=number("temperature", 0.7, 0.0, 2.0) or 0.0, top_p=top_p or 1.0,
                     max_tokens=max_tokens, stop=tuple(stop), seed=seed,
                     repetition_penalty=number("repetition_penalty", None, 1.0, 2.0), no_repeat_ngram=ngram)


# -- generation -----------------------------------------------------------------------------------------------------
_READY, _END = object(), object()


@dataclass(frozen=True)
class Outcome:
    """The accounting of a finished generation."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (the model ended, or a client stop string in the answer) or "length"


class Job:
    """One generation on its own worker thread, which keeps its gate slot until the model has really stopped.

    The worker loads the model and checks the prompt against its context first; `queue` then gets _READY (or _END
    at once when that failed: `done` holds the error), the visible text piece by piece, and _END. Setting `cancel`
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
        self.done: asyncio.Future[Outcome] = _in_thread(gate, lambda: self._work(pool, limits.max_context))

    def left(self) -> float:
        """Seconds until the deadline."""
        return max(0.0, self.deadline - time.monotonic())

    def watch(self, request: Request) -> None:
        """Cancel the job as soon as the client disconnects, for as long as it runs (streams included: also before
        their first event, where no response code would notice)."""
        watcher = asyncio.ensure_future(_disconnected(request))
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
                raise _failure(exc) from None
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
        if first is _END:
            try:
                await self.done
            except Exception as exc:  # noqa: BLE001 (every failure becomes an OpenAI-shaped error response)
                raise _failure(exc) from None
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
                    self._emit(_READY)
                    return generate(loaded, self.call, params, prompt_tokens, self._emit, self.cancel, self.deadline)
            finally:
                pool.release(loaded)
        finally:
            self._emit(_END)


def fit_context(loaded: Loaded, call: Call, max_context: int) -> tuple[GenParams, int]:
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


def generate(loaded: Loaded, call: Call, params: GenParams, prompt_tokens: int, emit: Callable[[Any], None],
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


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(job: Job) -> dict[str, Any]:
    """A whole answer in OpenAI's chat.completion shape (the job holds a gate slot)."""
    call = job.call
    outcome: Outcome = await job.wait(job.done)
    pieces = []
    while not job.queue.empty():  # everything the worker emitted is queued before its future settles
        item = job.queue.get_nowait()
        if item is not _READY and item is not _END:
            pieces.append(item)
    text = "".join(pieces)
    message = {"role": "assistant", "content": text if call.show_analysis else text.strip(), "refusal": None}
    return {"id": call.id, "object": "chat.completion", "created": call.created, "model": call.entry.id,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": outcome.finish_reason}],
            "usage": {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                      "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}}


def _failure(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackendError):
        return ApiError(502, f"the model failed: {exc}", kind="server_error", code="backend_error")
    if isinstance(exc, PersllmError):
        return ApiError(500, str(exc), kind="server_error", code="model_unavailable")
    log.exception("generation failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error")


async def _events(job: Job) -> AsyncIterator[str]:
    """The SSE events of a started job; leaving early (the client disconnected) cancels it."""
    call = job.call
    yield _sse(_chunk(call, {"role": "assistant", "content": ""}))
    try:
        ended = False
        while not ended:
            item = await asyncio.wait_for(job.queue.get(), job.left())
            if item is _END:
                break
            # Coalesce what is already queued into one event: when the model outpaces the network or the client,
            # fewer, larger chunks cost far less than one JSON event per token (the text is identical).
            while not job.queue.empty():
                more = job.queue.get_nowait()
                if more is _END:
                    ended = True
                    break
                item += more
            if item:
                yield _sse(_chunk(call, {"content": item}))
        outcome: Outcome = await asyncio.wait_for(job.done, job.left())
    except TimeoutError:
        yield _sse(ApiError(504, "generation took too long", kind="server_error", code="timeout").body())
        yield "data: [DONE]\n\n"
        return
    except Exception as exc:  # noqa: BLE001 (every failure becomes an error event in the stream)
        yield _sse(_failure(exc).body())
        yield "data: [DONE]\n\n"
        return
    finally:
        job.cancel.set()  # also when the client disconnects (the task is cancelled): the model stops at once
    yield _sse(_chunk(call, {}, outcome.finish_reason))
    if call.include_usage:
        usage = {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                 "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}
        yield _sse(_chunk(call, None, usage=usage))
    yield "data: [DONE]\n\n"


def _chunk(call: Call, delta: dict[str, Any] | None, finish: str | None = None,
           usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One chat.completion.chunk; delta None is the usage-only chunk (no choices) sent last."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    chunk: dict[str, Any] = {"id": call.id, "object": "chat.completion.chunk", "created": call.created,
                             "model": call.entry.id, "system_fingerprint": None, "choices": choices}
    if call.include_usage:
        chunk["usage"] = usage
    return chunk


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class BodyLimit:
    """ASGI middleware: request bodies over `max_bytes` get 413, whether announced by Content-Length or streamed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            from fastapi.responses import JSONResponse

            await JSONResponse(self._error().body(), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._error()  # answered by the app's ApiError handler
            return message

        await self.app(scope, limited, send)

    def _error(self) -> ApiError:
        return ApiError(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")
