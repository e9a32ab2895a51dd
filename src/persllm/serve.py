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
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request

from persllm import template, variants
from persllm.backends.base import Backend, Completion, GenParams
from persllm.config import Project
from persllm.errors import BackendError, ConfigError, PersllmError
from persllm.types import Message

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
        return f"{variant}:{project.base_model.spec}+{variants.adapter_dir(project, variant)}"
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
        # Local weights serve one request at a time anyway, and a transformers tokenizer is not safe to use from
        # several threads at once; HTTP and scripted backends take concurrent requests.
        self.serial = threading.Lock() if isinstance(backend, HFBackend | LlamaCpp) else None
        self._count: Callable[[str], int] = lambda text: len(text.split())
        if isinstance(backend, HFBackend):
            self._count = _token_counter(backend.tokenizer)

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
        from persllm.backends.hf import HFBackend

        if isinstance(self.backend, HFBackend):
            return self.count(self.backend.render(messages))
        return sum(self.count(m.content) for m in messages)


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
@dataclass(frozen=True)
class Limits:
    """Admission and size limits of the server."""

    max_concurrency: int = 4
    max_queue: int = 32
    timeout: float = 300.0  # seconds a request may take once it has a slot (loading the model included)
    max_body: int = 1 << 20  # bytes of a request body
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    default_max_tokens: int = 512


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

    _routes(app, entries, keys, limits, pool, gate)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body)
    return app



def _routes(app: Any, entries: dict[str, ModelEntry], keys: tuple[str, ...], limits: Limits, pool: ModelPool,
            gate: Gate) -> None:
    from fastapi.responses import StreamingResponse

    created = int(time.time())

    def auth(request: Request) -> None:
        if not key_ok(keys, request.headers.get("authorization")):
            raise ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer KEY' with a key "
                           f"from the server's key file or ${KEYS_ENV}", code="invalid_api_key")

    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(entries), "loaded": pool.loaded(), "running": gate.running,
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
        if call.stream:
            return StreamingResponse(start_stream(call, pool, gate, limits.timeout), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(call, pool, gate, limits.timeout)

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
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None


def parse_call(body: Any, entries: dict[str, ModelEntry], limits: Limits) -> Call:
    """Validate a /v1/chat/completions body; problems become 400/404 ApiErrors naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    entry = _entry(entries, body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, "only n=1 is supported", param="n")
    try:
        prompt = persona_messages(entry, messages)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    flags = {k: body.get(k, False) for k in ("stream", "show_analysis")}
    options = body.get("stream_options") or {}
    if any(not isinstance(v, bool) for v in flags.values()) or not isinstance(options, dict):
        raise ApiError(400, "stream and show_analysis must be true or false; stream_options an object")
    return Call(entry, tuple(prompt), _params(body, limits), flags["stream"], flags["show_analysis"],
                options.get("include_usage") is True, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()))


def _params(body: dict[str, Any], limits: Limits) -> GenParams:
    def number(name: str, default: float | None, low: float, high: float) -> float | None:
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ApiError(400, f"{name} must be a number from {low} to {high}", param=name)
        return float(value)

    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or limits.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be an integer from 1 to {limits.max_tokens}", param="max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "seed must be an integer", param="seed")
    ngram = body.get("no_repeat_ngram_size")  # transformers' name; repetition_penalty is vLLM's and llama.cpp's
    if ngram is not None and (isinstance(ngram, bool) or not isinstance(ngram, int) or not 0 <= ngram <= 16):
        raise ApiError(400, "no_repeat_ngram_size must be an integer from 0 (off) to 16", param="no_repeat_ngram_size")
    return GenParams(temperature=number("temperature", 0.7, 0.0, 2.0) or 0.0,
                     top_p=number("top_p", 1.0, 0.0, 1.0) or 1.0, max_tokens=max_tokens, stop=tuple(stop), seed=seed,
                     repetition_penalty=number("repetition_penalty", None, 1.0, 2.0), no_repeat_ngram=ngram)


# -- generation -----------------------------------------------------------------------------------------------------
async def complete(call: Call, pool: ModelPool, gate: Gate, timeout: float) -> dict[str, Any]:
    """A whole answer in OpenAI's chat.completion shape (the caller holds a gate slot)."""
    def work() -> tuple[Completion, int, int]:
        loaded = pool.acquire(call.entry)
        try:
            with loaded.turn():
                done = loaded.backend.complete(list(call.messages), call.params)
                return (done, done.prompt_tokens or loaded.prompt_tokens(call.messages),
                        done.completion_tokens or loaded.count(done.text))
        finally:
            pool.release(loaded)

    try:
        done, prompt_tokens, completion_tokens = await asyncio.wait_for(_in_thread(gate, work), timeout)
    except TimeoutError:
        raise ApiError(504, f"generation took longer than {timeout:.0f}s", kind="server_error",
                       code="timeout") from None
    except Exception as exc:  # noqa: BLE001 (every failure becomes an OpenAI-shaped error response)
        raise _failure(exc) from None
    raw = _cut(done.text, call.params.stop)
    text = raw if call.show_analysis else template.visible_answer(raw)
    message = {"role": "assistant", "content": text, "refusal": None}
    return {"id": call.id, "object": "chat.completion", "created": call.created, "model": call.entry.id,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _cut(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


def _failure(exc: BaseException) -> ApiError:
    if isinstance(exc, BackendError):
        return ApiError(502, f"the model failed: {exc}", kind="server_error", code="backend_error")
    if isinstance(exc, PersllmError):
        return ApiError(500, str(exc), kind="server_error", code="model_unavailable")
    log.exception("generation failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error")


_END = object()


def start_stream(call: Call, pool: ModelPool, gate: Gate, timeout: float) -> AsyncIterator[str]:
    """Start generating on a worker thread now (the caller holds a slot) and return the SSE events to send."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()
    deadline = time.monotonic() + timeout

    def emit(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server has shut down
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> tuple[int, int]:
        try:
            loaded = pool.acquire(call.entry)
            try:
                with loaded.turn():
                    text = _pump(loaded.backend.stream(list(call.messages), call.params), emit, cancel, deadline)
                    # Streams yield text, not tokens: the count re-tokenizes it (exact for ordinary text; bytes that
                    # decode to U+FFFD can re-tokenize longer, hence the cap at what could have been generated).
                    return loaded.prompt_tokens(call.messages), min(loaded.count(text), call.params.max_tokens)
            finally:
                pool.release(loaded)
        finally:
            emit(_END)

    return _events(call, queue, _in_thread(gate, work), cancel, deadline)


def _pump(pieces: Iterator[str], emit: Callable[[Any], None], cancel: threading.Event, deadline: float) -> str:
    """Hand pieces to the loop until the stream ends, the client leaves, a stop string is hit, or time runs out."""
    out = []
    try:
        for piece in pieces:
            out.append(piece)
            emit(piece)
            if cancel.is_set() or time.monotonic() > deadline:
                break
    finally:
        if isinstance(pieces, Generator):
            pieces.close()
    return "".join(out)


async def _events(call: Call, queue: asyncio.Queue[Any], future: asyncio.Future[Any], cancel: threading.Event,
                  deadline: float) -> AsyncIterator[str]:
    from persllm.chat import AnswerFilter

    cutter, shown = StopCutter(call.params.stop), AnswerFilter(call.show_analysis)
    yield _sse(_chunk(call, {"role": "assistant", "content": ""}))
    try:
        ended = False
        while not ended:
            item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
            if item is _END:
                break
            # Coalesce what is already queued into one event: when the model outpaces the network or the client,
            # fewer, larger chunks cost far less than one JSON event per token (the text is identical).
            while not queue.empty():
                more = queue.get_nowait()
                if more is _END:
                    ended = True
                    break
                item += more
            text = shown.feed(cutter.feed(item))
            if cutter.stopped:
                cancel.set()  # no need to generate past a stop string
            if text:
                yield _sse(_chunk(call, {"content": text}))
        prompt_tokens, completion_tokens = await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        yield _sse(ApiError(504, "generation took too long", kind="server_error", code="timeout").body())
        yield "data: [DONE]\n\n"
        return
    except Exception as exc:  # noqa: BLE001 (every failure becomes an error event in the stream)
        yield _sse(_failure(exc).body())
        yield "data: [DONE]\n\n"
        return
    finally:
        cancel.set()  # also when the client disconnects: the worker stops at its next piece
    tail = shown.feed(cutter.finish()) + shown.finish()
    if tail:
        yield _sse(_chunk(call, {"content": tail}))
    finish = "stop" if cutter.stopped or completion_tokens < call.params.max_tokens else "length"
    yield _sse(_chunk(call, {}, finish))
    if call.include_usage:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
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
