"""OpenAI-compatible backend against a scripted HTTP transport: request shape, streaming, retries, errors, cache."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from persllm.backends.base import GenParams
from persllm.backends.cache import CachedBackend
from persllm.backends.openai_compat import OpenAICompatible
from persllm.errors import BackendError, ConfigError
from persllm.types import Message

URL = "http://llm.test/v1"
MESSAGES = [Message("system", "be brief"), Message("user", "hello")]


def ok(text: str = "hi there", finish: str = "stop") -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": text},
                                                  "finish_reason": finish}],
                                     "usage": {"prompt_tokens": 7, "completion_tokens": 2}})


def backend(handler, **kw) -> OpenAICompatible:  # type: ignore[no-untyped-def]
    return OpenAICompatible("m", base_url=URL, transport=httpx.MockTransport(handler), base_delay=0.01, **kw)


def test_request_body_and_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["path"] = request.url.path
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return ok()

    b = backend(handler)
    completion = b.complete(MESSAGES, GenParams(temperature=0.2, max_tokens=9, stop=("\n",), seed=3))
    assert completion.text == "hi there" and completion.prompt_tokens == 7
    assert seen["path"] == "/v1/chat/completions" and seen["auth"] == "Bearer sk-test"
    body = seen["body"]
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert (body["temperature"], body["max_tokens"], body["stop"], body["seed"]) == (0.2, 9, ["\n"], 3)
    assert b.usage.requests == 1 and b.usage.completion_tokens == 2


def test_raw_prompt_uses_completions_endpoint() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        assert json.loads(request.content)["prompt"] == "Once upon"
        return httpx.Response(200, json={"choices": [{"text": " a time", "finish_reason": "length"}]})

    completion = backend(handler).complete("Once upon")
    assert completion.text == " a time" and completion.finish_reason == "length"


def test_streaming_sse() -> None:
    chunks = [{"choices": [{"delta": {"content": piece}}]} for piece in ("Hel", "lo", "!")]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    assert list(backend(handler).stream(MESSAGES)) == ["Hel", "lo", "!"]


@pytest.mark.parametrize("failure", ["500", "timeout", "truncated_json", "empty_choices", "connect"])
def test_transient_failures_are_retried(failure: str) -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] < 3:
            if failure == "500":
                return httpx.Response(500, text="internal error")
            if failure == "timeout":
                raise httpx.ReadTimeout("slow", request=request)
            if failure == "connect":
                raise httpx.ConnectError("refused", request=request)
            if failure == "truncated_json":
                return httpx.Response(200, text='{"choices": [{"message": {"content": "hal')
            return httpx.Response(200, json={"choices": []})
        return ok("finally")

    b = backend(handler)
    assert b.complete(MESSAGES).text == "finally"
    assert calls["n"] == 3 and b.usage.retries == 2


def test_429_honours_retry_after_and_pauses_all_workers() -> None:
    calls = {"n": 0}
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            calls["n"] += 1
            first = calls["n"] == 1
        if first:
            return httpx.Response(429, headers={"retry-after": "0.5"}, text="slow down")
        return ok()

    b = backend(handler, concurrency=4)
    started = time.monotonic()
    results = list(b.complete_many([MESSAGES] * 4))
    assert all(not isinstance(r, BackendError) for _, r in results)
    assert time.monotonic() - started >= 0.5  # the rate-limited request waited the server's Retry-After


def test_gives_up_after_max_retries_with_endpoint_named() -> None:
    b = backend(lambda request: httpx.Response(503, text="overloaded"), max_retries=2)
    with pytest.raises(BackendError) as err:
        b.complete(MESSAGES)
    assert "HTTP 503 from http://llm.test/v1" in str(err.value) and "gave up after 3 attempts" in str(err.value)
    assert b.usage.failures == 1


@pytest.mark.parametrize(("status", "hint"), [(400, ""), (401, "check the API key"), (404, "check the model name")])
def test_client_errors_are_not_retried(status: int, hint: str) -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(status, text="nope")

    with pytest.raises(BackendError) as err:
        backend(handler).complete(MESSAGES)
    assert calls["n"] == 1 and f"HTTP {status} from {URL}" in str(err.value) and hint in str(err.value)


def test_complete_many_returns_every_item_once_with_errors_in_place() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        return httpx.Response(400, text="bad") if text == "q3" else ok(text.upper())

    b = backend(handler, concurrency=3)
    batch = [[Message("user", f"q{i}")] for i in range(10)]
    results = dict(b.complete_many(batch))
    assert sorted(results) == list(range(10))
    assert isinstance(results[3], BackendError)
    assert [results[i].text for i in range(10) if i != 3] == [f"Q{i}" for i in range(10) if i != 3]


def test_check_reports_unreachable_and_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(BackendError, match="cannot reach the OpenAI-compatible endpoint http://llm.test/v1"):
        backend(refuse).check()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="set the OPENAI_API_KEY environment variable"):
        OpenAICompatible("gpt-x")


def test_cache_answers_repeats_without_requests(tmp_path: Path) -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return ok(f"answer {calls['n']}")

    cached = CachedBackend(backend(handler), tmp_path / "cache.sqlite")
    first = cached.complete(MESSAGES)
    again = cached.complete(MESSAGES)
    assert first.text == again.text == "answer 1" and again.cached and calls["n"] == 1
    other_seed = cached.complete(MESSAGES, GenParams(seed=5))
    assert other_seed.text == "answer 2"
    reopened = CachedBackend(backend(handler), tmp_path / "cache.sqlite")  # survives the process
    assert reopened.complete(MESSAGES).text == "answer 1" and calls["n"] == 2
    results = dict(reopened.complete_many([MESSAGES, [Message("user", "new")]]))
    assert results[0].cached and results[1].text == "answer 3"
