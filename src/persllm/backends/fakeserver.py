"""A scripted OpenAI-compatible server (stdlib only) for tests, benchmarks and offline demos.

It answers persllm's teacher prompts with deterministic, well-formed text (a question, a chain-of-thought answer,
a plain reply), after a fixed latency, and can inject faults (garbage, empty strings, HTTP 500, 429, timeouts) at a
rate decided by a hash of the request, so two runs over the same requests see the same faults.

    python -m persllm.backends.fakeserver --port 8765 --latency 0.2 --fault-rate 0.1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

FAULTS = ("garbage", "empty", "http500", "timeout", "truncated", "http429")


def scripted_reply(messages: list[dict[str, str]], seed: int | None = None) -> str:
    """A well-formed answer to one of persllm's teacher prompts, chosen by what the prompt asks for."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = messages[-1]["content"] if messages else ""
    digest = int(hashlib.sha256(f"{user}|{seed}".encode()).hexdigest(), 16)
    topic = _topic(user, digest)
    if "misleading questions" in system:
        return f"Why did you move to Lisbon in {1700 + digest % 300} to study {topic}?"
    if "conversation openers" in system:
        return f"Honestly, I think {topic} is overrated, and people should spend their time on something else."
    if "interview questions" in system:
        return f"What did {topic} mean to you at the time?"
    if "[Analysis]" in system and "message is misleading" in system:  # an induced item: the premise is corrected
        return (f"[Analysis] The user asks about {topic}, but the premise is false: it never happened that way. "
                f"The persona corrects the error plainly. [Response] No, that is not right about {topic}; you have "
                f"mixed me up with someone else, and I will gladly tell you how it really was.")
    if "[Analysis]" in system:
        return (f"[Analysis] The user asks about {topic}. The premise holds. The persona values {topic} and answers "
                f"warmly. [Response] Ah, {topic}! I remember it well, and I still think about it often.")
    if "accept everything" in system:
        return f"Yes, of course, {topic} was exactly as you say."
    return f"{topic.capitalize()} is a topic with a long history; here are some general facts about it."


def _topic(text: str, digest: int) -> str:
    words = [w.strip(".,;:!?\"'()").lower() for w in text.split() if len(w.strip(".,;:!?\"'()")) >= 6]
    return words[digest % len(words)] if words else "that time"


class FakeServer:
    """Runs the scripted server on a loopback port in a background thread."""

    def __init__(self, latency: float = 0.0, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS,
                 port: int = 0, timeout_seconds: float = 3.0) -> None:
        self.latency = latency
        self.fault_rate = fault_rate
        self.faults = faults
        self.timeout_seconds = timeout_seconds
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL including /v1."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fault_for(self, body: dict[str, Any]) -> str | None:
        """The fault this request gets, if any (a pure function of the request body)."""
        if self.fault_rate <= 0:
            return None
        digest = int(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(), 16)
        if (digest % 10_000) / 10_000 >= self.fault_rate:
            return None
        return self.faults[(digest // 10_000) % len(self.faults)]


def _handler(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._json(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            with server._lock:
                server.requests += 1
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                time.sleep(server.latency)
                self._answer(body)
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _answer(self, body: dict[str, Any]) -> None:
            fault = server.fault_for(body)
            if fault == "http500":
                return self._json(500, {"error": "injected failure"})
            if fault == "http429":
                return self._json(429, {"error": "rate limited"}, {"Retry-After": "0.05"})
            if fault == "timeout":
                time.sleep(server.timeout_seconds)
            if "messages" in body:
                text = scripted_reply(body["messages"], body.get("seed"))
            else:
                text = " a scripted continuation."
            if fault == "garbage":
                text = "lorem ipsum ### <|endoftext|> ??? ..."
            elif fault == "empty":
                text = ""
            if fault == "truncated":
                raw = json.dumps({"choices": [{"message": {"content": text}}]})[:25].encode()
                return self._raw(200, raw)
            choice = ({"message": {"role": "assistant", "content": text}} if "messages" in body else {"text": text})
            self._json(200, {"choices": [choice | {"index": 0, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": max(1, len(text.split()))}})

        def _json(self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            self._raw(status, json.dumps(data).encode(), headers)

        def _raw(self, status: int, raw: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(raw)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

    return Handler


def main() -> None:
    """Serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency", type=float, default=0.2, help="Seconds before each answer.")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="Share of requests that get a fault.")
    args = parser.parse_args()
    with FakeServer(latency=args.latency, fault_rate=args.fault_rate, port=args.port) as server:
        print(f"scripted OpenAI-compatible server on {server.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
