"""Request parsing: a /v1/chat/completions body checked field by field into a Call, in the persona's prompt format."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from persllm import template
from persllm.backends.base import GenParams
from persllm.serve.errors import ApiError
from persllm.serve.ids import ModelEntry
from persllm.types import Message

HISTORY_TURNS = 8  # earlier exchanges kept in the prompt; older ones are dropped so prompts fit small context windows
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
        raise ValueError("message content must be a string or a list of text parts")  # noqa: TRY004 - a 400
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError("only text content is supported")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def find_entry(entries: dict[str, ModelEntry], model: Any) -> ModelEntry:
    if not isinstance(model, str) or model not in entries:
        raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists the ids "
                       "(persona@stage:variant, or persona@stage for the best variant)", code="model_not_found",
                       param="model")
    return entries[model]


async def read_json(request: Any) -> Any:
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
    entry = find_entry(entries, body.get("model"))
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
