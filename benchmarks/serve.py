"""`persllm serve` overhead and load, against a tiny random model (so the server's own cost is what is measured).

- overhead: tokens/s and time to first token, streamed through `persllm serve` with the official openai client, vs
  streaming from the same backend in-process;
- load: sustained concurrent streamed requests for LOAD_SECONDS, with p50/p95 latency and the error count.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PROJECT = REPO / "examples" / "ada-lovelace"
REQUESTS = 16
MAX_TOKENS = 48
LOAD_SECONDS = float(os.environ.get("PERSLLM_LOAD_SECONDS", "65"))
LOAD_CLIENTS = 8


def _tiny_model(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import build_tiny_model  # the same tiny Gemma3 the tests use; built locally in a second

    return build_tiny_model(root / "tiny")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(tiny: Path, out: Path, *options: str) -> Iterator[tuple[str, int]]:
    """`persllm serve` on the tiny model in a subprocess with these CLI options: (its URL, its PID) once healthy."""
    port = _free_port()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # same threads as the direct path
    proc = subprocess.Popen([sys.executable, "-m", "persllm", "serve", str(PROJECT), "--set", f"base_model=hf:{tiny}",
                             "--set", f"output_dir={out}", "--port", str(port), *options],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("persllm serve did not start")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def _server(tiny: Path, out: Path, max_concurrency: int = 4) -> Iterator[str]:
    with serve_process(tiny, out, "--max-concurrency", str(max_concurrency), "--max-queue", "64") as (url, _):
        yield url + "/v1"


def _questions(n: int) -> list[str]:
    topics = ["the engine", "your mother", "mathematics", "music", "the loom", "poetry", "your health", "London"]
    return [f"What do you think about {topics[i % len(topics)]}, question {i}?" for i in range(n)]


def _stream_direct(tiny: Path, questions: list[str]) -> tuple[float, float, int]:
    import torch

    from persllm import template
    from persllm.backends.base import GenParams
    from persllm.backends.hf import HFBackend
    from persllm.config import load_project

    torch.set_num_threads(1)  # a tiny model gains nothing from threads; the server process gets 1 thread too
    project = load_project(PROJECT)
    backend = HFBackend(tiny)
    ctx = template.context_for(project, project.stages[-1].id)
    params = GenParams(temperature=0.0, max_tokens=MAX_TOKENS)
    list(backend.stream(template.prompt_messages(ctx, "warm up"), params))
    ttfts, tokens, started = [], 0, time.monotonic()
    for question in questions:
        t0 = time.monotonic()
        first = None
        for piece in backend.stream(template.prompt_messages(ctx, question), params):
            first = first or time.monotonic() - t0
            tokens += len(backend.tokenizer(piece, add_special_tokens=False)["input_ids"])
        ttfts.append(first or 0.0)
    return tokens / (time.monotonic() - started), statistics.median(ttfts), tokens


def _stream_served(url: str, model: str, questions: list[str]) -> tuple[float, float, int]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none")
    list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "warm up"}],
                                        stream=True, max_tokens=MAX_TOKENS, temperature=0.0))
    ttfts, tokens, started = [], 0, time.monotonic()
    for question in questions:
        t0 = time.monotonic()
        first = None
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                stream=True, max_tokens=MAX_TOKENS, temperature=0.0,
                                                extra_body={"show_analysis": True},
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.monotonic() - t0
            if chunk.usage:
                tokens += chunk.usage.completion_tokens
        ttfts.append(first or 0.0)
    return tokens / (time.monotonic() - started), statistics.median(ttfts), tokens


def run() -> list[dict]:
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as tmp:
        tiny = _tiny_model(Path(tmp))
        questions = _questions(REQUESTS)
        direct_tps, direct_ttft, _ = _stream_direct(tiny, questions)
        with _server(tiny, Path(tmp) / "out") as url:
            model = f"ada-lovelace@{'mature'}:base"
            assert any(m.id == model for m in OpenAI(base_url=url, api_key="none").models.list())
            served_tps, served_ttft, n = _stream_served(url, model, questions)
    return [
        {"benchmark": "serve: streamed tokens/s (tiny model)", "persllm": served_tps, "baseline": direct_tps,
         "unit": "t/s", "ratio": served_tps / direct_tps, "higher_is_better": True,
         "baseline_name": "same backend in-process", "note": f"{n} tokens over {REQUESTS} requests"},
        {"benchmark": "serve: time to first token (median)", "persllm": served_ttft, "baseline": direct_ttft,
         "unit": "s", "ratio": served_ttft / max(direct_ttft, 1e-9), "higher_is_better": False,
         "baseline_name": "same backend in-process", "note": "ratio = served / direct"},
    ]


def run_load() -> list[dict]:
    """LOAD_CLIENTS clients stream requests back to back for LOAD_SECONDS; report latency and errors."""
    from openai import OpenAI

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = _tiny_model(Path(tmp))
        with _server(tiny, Path(tmp) / "out", max_concurrency=4) as url:
            stop_at = time.monotonic() + LOAD_SECONDS

            def client_loop(seed: int) -> None:
                client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
                i = 0
                while time.monotonic() < stop_at:
                    t0 = time.monotonic()
                    try:
                        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                            model="ada-lovelace@young:base", stream=True, max_tokens=24, temperature=0.7,
                            messages=[{"role": "user", "content": f"Client {seed} asks question {i}."}])
                            if c.choices)
                        with lock:
                            latencies.append(time.monotonic() - t0)
                        assert isinstance(text, str)
                    except Exception as exc:  # noqa: BLE001 - every failure counts; the load test reports them all
                        with lock:
                            errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    i += 1

            threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(LOAD_CLIENTS)]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.monotonic() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2] if latencies else float("nan")
    p95 = latencies[int(len(latencies) * 0.95) - 1] if latencies else float("nan")
    note = (f"{len(latencies)} requests in {seconds:.0f} s from {LOAD_CLIENTS} clients, p50 {p50:.2f} s, "
            f"p95 {p95:.2f} s, errors {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    return [{"benchmark": "serve load: errors over sustained traffic", "persllm": float(len(errors)),
             "baseline": 0.0, "unit": "err", "ratio": 1.0 if not errors else 0.0, "higher_is_better": False,
             "baseline_name": "zero errors expected", "note": note,
             "p50_s": p50, "p95_s": p95, "requests": len(latencies), "seconds": seconds, "errors": len(errors)}]
