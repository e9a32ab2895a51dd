"""The FastAPI app: routes for /v1/models, /v1/chat/completions and /health over the pool, the gate and the jobs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request

from persllm import variants
from persllm.config import Project
from persllm.serve.errors import ApiError
from persllm.serve.gate import Busy, Gate
from persllm.serve.http import KEYS_ENV, key_ok
from persllm.serve.ids import ModelEntry, Served, model_entries
from persllm.serve.job import Job
from persllm.serve.parse import Limits, find_entry, parse_call, read_json
from persllm.serve.pool import ModelPool, Opener
from persllm.serve.responses import complete, events
from persllm.variants import backend_key


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
        return _model_card(find_entry(entries, model_id), created)

    async def chat(request: Request) -> Any:
        auth(request)
        call = parse_call(await read_json(request), entries, limits)
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
        return StreamingResponse(events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])


def _model_card(entry: ModelEntry, created: int) -> dict[str, Any]:
    return {"id": entry.id, "object": "model", "created": created, "owned_by": "persllm",
            "persona": entry.project.name, "stage": entry.stage, "variant": entry.variant,
            "label": entry.project.stage(entry.stage).label}


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
