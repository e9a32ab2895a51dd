"""Answers in OpenAI's shapes: a whole chat.completion, or a stream of chat.completion.chunk server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from persllm.serve.errors import ApiError, api_error
from persllm.serve.job import END, READY, Job, Outcome
from persllm.serve.parse import Call


async def complete(job: Job) -> dict[str, Any]:
    """A whole answer in OpenAI's chat.completion shape (the job holds a gate slot)."""
    call = job.call
    outcome: Outcome = await job.wait(job.done)
    pieces = []
    while not job.queue.empty():  # everything the worker emitted is queued before its future settles
        item = job.queue.get_nowait()
        if item is not READY and item is not END:
            pieces.append(item)
    text = "".join(pieces)
    message = {"role": "assistant", "content": text if call.show_analysis else text.strip(), "refusal": None}
    return {"id": call.id, "object": "chat.completion", "created": call.created, "model": call.entry.id,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": outcome.finish_reason}],
            "usage": {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                      "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}}


async def events(job: Job) -> AsyncIterator[str]:
    """The SSE events of a started job; leaving early (the client disconnected) cancels it."""
    call = job.call
    yield _sse(_chunk(call, {"role": "assistant", "content": ""}))
    try:
        ended = False
        while not ended:
            item = await asyncio.wait_for(job.queue.get(), job.left())
            if item is END:
                break
            # Coalesce what is already queued into one event: when the model outpaces the network or the client,
            # fewer, larger chunks cost far less than one JSON event per token (the text is identical).
            while not job.queue.empty():
                more = job.queue.get_nowait()
                if more is END:
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
        yield _sse(api_error(exc).body())
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

