"""Any OpenAI-compatible /v1/chat/completions endpoint: OpenAI, vLLM, Ollama, the llama.cpp server, persllm serve."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import httpx

from persllm.backends.base import Completion, GenParams, Request, Result, Usage, with_retries
from persllm.decoding import Repetition
from persllm.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from persllm.backends.registry import OpenOptions
    from persllm.config import ModelSpec

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAICompatible:
    """HTTP client for one model at one OpenAI-compatible endpoint."""

    in_process = False
    streaming = True
    scoring = False  # chat endpoints give no log-likelihoods of a given continuation
    own_chat_template = True  # the server renders chat with its model's template
    parameters: int | None = None  # not reported by the API

    def __init__(self, model: str, base_url: str = "", api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_retries: int = 5, concurrency: int = 8, transport: httpx.BaseTransport | None = None,
                 base_delay: float = 1.0) -> None:
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.model = model
        self.name = f"openai:{model}@{self.base_url}"
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.repetition = Repetition()  # nothing unless set: a server's own defaults stand
        self.base_delay = base_delay
        self.usage = Usage()
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        if not key and self.base_url == DEFAULT_BASE_URL:
            raise ConfigError(f"no API key for {self.base_url}: set the {api_key_env} environment variable "
                              "(or point base_url at a local server)")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, transport=transport,
                                    timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
                                    limits=httpx.Limits(max_connections=concurrency + 2))
        self._pause_until = 0.0  # shared back-off: one 429 slows every worker, not just the one that got it
        self._lock = threading.Lock()

    # -- the Backend protocol -------------------------------------------------------------------------------
    def complete(self, request: Request, params: GenParams = GenParams()) -> Completion:
        """One completion (chat, or raw text via /completions), retried on 429/5xx/timeouts/connection errors."""
        started = time.monotonic()
        completion = with_retries(lambda: self._post(request, params), what=self.name,
                                  max_retries=self.max_retries, usage=self.usage, base_delay=self.base_delay)
        with self._lock:
            self.usage.add(completion, time.monotonic() - started)
        return completion

    def stream(self, request: Request, params: GenParams = GenParams()) -> Iterator[str]:
        """Stream the answer as text deltas (server-sent events)."""
        body = self._body(request, params) | {"stream": True}
        try:
            with self._client.stream("POST", _path(request), json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise self._http_error(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    delta = _delta(data)
                    if delta:
                        yield delta
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc

    def complete_many(self, batch: Sequence[Request], params: GenParams = GenParams()) -> Iterator[Result]:
        """Up to `concurrency` requests in flight; results are yielded as they finish."""
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="persllm-http")
        pending: dict[Future[Completion], int] = {}
        items = iter(enumerate(batch))
        try:
            for index, messages in items:
                pending[pool.submit(self.complete, messages, params)] = index
                if len(pending) >= self.concurrency * 2:
                    break
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    exc = future.exception()
                    if exc is not None and not isinstance(exc, BackendError):
                        raise exc
                    yield index, (exc if exc is not None else future.result())
                    nxt = next(items, None)
                    if nxt is not None:
                        pending[pool.submit(self.complete, nxt[1], params)] = nxt[0]
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def check(self) -> None:
        """Fail fast, with a clear message, when the endpoint cannot be reached or rejects the key."""
        try:
            response = self._client.get("/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach the OpenAI-compatible endpoint {self.base_url} ({_reason(exc)}); "
                               "is the server running and is base_url right?") from exc
        if response.status_code in (401, 403):
            raise BackendError(f"{self.base_url} rejected the API key (HTTP {response.status_code}); "
                               "check the key in the environment variable named by api_key_env")

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    # -- internals ------------------------------------------------------------------------------------------
    def _body(self, request: Request, params: GenParams) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model}
        if isinstance(request, str):
            body["prompt"] = request
        else:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request]
        body |= {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.repetition_penalty not in (None, 1.0):  # vLLM's and llama.cpp server's extension
            body["repetition_penalty"] = params.repetition_penalty
        return body

    def _post(self, request: Request, params: GenParams) -> Completion:
        self._wait_for_pause()
        try:
            response = self._client.post(_path(request), json=self._body(request, params))
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        if response.status_code != 200:
            raise self._http_error(response)
        try:
            data = response.json()
            choice = data["choices"][0]
            text = (choice["text"] if isinstance(request, str) else choice["message"]["content"]) or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"malformed response from {self.base_url}: {response.text[:200]!r}",
                               retryable=True) from exc
        usage = data.get("usage") or {}
        return Completion(text=text, finish_reason=choice.get("finish_reason") or "stop",
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0),
                          model=str(data.get("model") or ""))

    def _wait_for_pause(self) -> None:
        delay = self._pause_until - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _http_error(self, response: httpx.Response) -> BackendError:
        status = response.status_code
        body = response.text[:200].replace("\n", " ")
        if status == 429 or status >= 500:
            retry_after = _retry_after(response.headers.get("retry-after"))
            if status == 429 and retry_after is not None:
                with self._lock:
                    self._pause_until = max(self._pause_until, time.monotonic() + retry_after)
            return BackendError(f"HTTP {status} from {self.base_url}: {body}", retryable=True, retry_after=retry_after)
        hint = " (check the API key)" if status in (401, 403) else " (check the model name)" if status == 404 else ""
        return BackendError(f"HTTP {status} from {self.base_url}{hint}: {body}")

    def _transport_error(self, exc: httpx.HTTPError) -> BackendError:
        return BackendError(f"{_reason(exc)} talking to {self.base_url}", retryable=True)


def _path(request: Request) -> str:
    return "/completions" if isinstance(request, str) else "/chat/completions"


def _reason(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    return type(exc).__name__


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _delta(data: str) -> str:
    try:
        choice = json.loads(data)["choices"][0]
        return choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def from_spec(spec: ModelSpec, options: OpenOptions) -> OpenAICompatible:
    """`openai:MODEL[@URL]`, contacted once now when `options.check` (BACKENDS row)."""
    backend = OpenAICompatible(spec.model, base_url=spec.base_url, api_key_env=spec.api_key_env, timeout=spec.timeout,
                               max_retries=spec.max_retries, concurrency=spec.concurrency)
    if options.check:
        backend.check()
    return backend
