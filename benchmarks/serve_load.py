"""`persllm serve` under clients that leave: 100 concurrent streaming clients, 20 of which disconnect mid-stream.

Against the tiny random model, on loopback, in a server subprocess watched through /proc (Linux):

- idle: seconds from the last honest request's end until the server's CPU is idle (target <= 1 s): no generation
  outlives its client;
- memory: the server's RSS after the run against its RSS after warm-up (target within 10%);
- cost of a client that leaves: the server's CPU seconds per abandoned stream (the mixed run's CPU minus that of the
  same honest clients alone, over the leavers), against the same request run to its end (target under a quarter).
  This is the sharper check: a local model serves one request at a time, so generations that outlive their clients
  delay the honest requests behind them, and the server may still be idle right after the last of those (before
  cancellation, 20 leavers made 80 honest streams take 50 s instead of 10 s, at 2.2 CPU-s per leaver).

Stops by itself (every client has a timeout, the server is terminated at the end); about a minute on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.serve import _tiny_model, serve_process

CLIENTS, LEAVERS = 100, 20
HONEST_TOKENS = 32
LEAVE_AFTER = 0.2  # seconds a leaver stays after its stream started
MAX_LEAVER_SHARE = 0.25  # target: a leaver costs under this share of its request run to the end
IDLE_CORE = 0.05  # "idle": under 5% of one core over IDLE_WINDOW
IDLE_WINDOW = 0.25
MODEL = "ada-lovelace@mature:base"
# Every leaver asks the same (the tiny model answers it up to max_tokens), so one measured run is what each would cost.
LEAVER_QUESTION = "What is the Analytical Engine?"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """What one wave of clients saw."""

    honest_ends: list[float] = field(default_factory=list)
    left: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, all threads


def _rss_mb(pid: int) -> float:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _server(tiny: Path, out: Path) -> contextlib.AbstractContextManager[tuple[str, int]]:
    return serve_process(tiny, out, "--max-concurrency", "4", "--max-queue", str(2 * CLIENTS), "--timeout", "120")


def _body(question: str, max_tokens: int, endless: bool = False) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "stream": True,
            "max_tokens": max_tokens}
    if endless:  # greedy without anti-repetition: the tiny model loops and never ends by itself
        body |= {"temperature": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    return body


def _honest(url: str, i: int, run: Run) -> None:
    try:
        body = _body(f"Question {i}: the engine?", HONEST_TOKENS)
        with httpx.Client(timeout=120) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            text = "".join(r.iter_text())
        if r.status_code != 200 or not text.endswith("data: [DONE]\n\n") or '"error"' in text:
            raise RuntimeError(f"HTTP {r.status_code}: {text[-200:]}")
        with run.lock:
            run.honest_ends.append(time.monotonic())
    except Exception as exc:  # noqa: BLE001 (every failure counts; the benchmark reports them)
        with run.lock:
            run.errors.append(f"honest {i}: {type(exc).__name__}: {exc}"[:200])


def _leaver(url: str, i: int, max_tokens: int, run: Run) -> None:
    try:
        body = _body(LEAVER_QUESTION, max_tokens, endless=True)
        with httpx.Client(timeout=120) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read()[-200:]!r}")
            lines = r.iter_lines()  # kept until we leave: dropping it would close the connection at once
            next(lines)
            time.sleep(LEAVE_AFTER)
        with run.lock:
            run.left.append(time.monotonic())
    except Exception as exc:  # noqa: BLE001 (every failure counts; the benchmark reports them)
        with run.lock:
            run.errors.append(f"leaver {i}: {type(exc).__name__}: {exc}"[:200])


def _wave(url: str, leavers: int, leaver_tokens: int) -> Run:
    """CLIENTS - LEAVERS honest clients plus `leavers`, all at once; leavers spread over the first 60% of arrivals,
    so that the last requests are honest ones."""
    run = Run()
    honest = CLIENTS - LEAVERS
    spots = {round(k * 0.6 * (honest + leavers) / max(1, leavers)) for k in range(leavers)}
    threads, h, lv = [], 0, 0
    for slot in range(honest + leavers):
        if slot in spots and lv < leavers:
            threads.append(threading.Thread(target=_leaver, args=(url, lv, leaver_tokens, run)))
            lv += 1
        else:
            threads.append(threading.Thread(target=_honest, args=(url, h, run)))
            h += 1
    for thread in threads:
        thread.start()
        time.sleep(0.002)  # arrival order = slot order
    for thread in threads:
        thread.join(timeout=300)
    return run


def _idle_after(pid: int, since: float, limit: float = 10.0) -> float:
    """Seconds from `since` until the process's CPU stays under IDLE_CORE for IDLE_WINDOW (inf if never)."""
    samples: list[tuple[float, float]] = []
    stop = since + limit
    while time.monotonic() < stop:
        samples.append((time.monotonic(), _cpu_seconds(pid)))
        now, cpu = samples[-1]
        for t0, c0 in samples:
            if now - t0 >= IDLE_WINDOW and (cpu - c0) / (now - t0) < IDLE_CORE:
                return max(0.0, t0 - since)
        samples = [s for s in samples if now - s[0] < 2 * IDLE_WINDOW]
        time.sleep(0.02)
    return float("inf")


def run() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tiny = _tiny_model(Path(tmp))
        with _server(tiny, Path(tmp) / "out") as (url, pid):
            warm = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                              json=_body("warm up", HONEST_TOKENS) | {"stream": False}).json()
            prompt = warm["usage"]["prompt_tokens"]
            leaver_tokens = min(1500, 2048 - prompt - 64)  # the tiny model's context is 2048
            t0, c0 = time.monotonic(), _cpu_seconds(pid)
            full = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                              json=_body(LEAVER_QUESTION, leaver_tokens, endless=True) | {"stream": False}).json()
            full_cpu, full_s = _cpu_seconds(pid) - c0, time.monotonic() - t0
            _idle_after(pid, time.monotonic())
            rss_start = _rss_mb(pid)

            c0, t0 = _cpu_seconds(pid), time.monotonic()
            alone = _wave(url, 0, leaver_tokens)
            _idle_after(pid, max(alone.honest_ends, default=time.monotonic()))
            alone_cpu, alone_s = _cpu_seconds(pid) - c0, time.monotonic() - t0

            c0, t0 = _cpu_seconds(pid), time.monotonic()
            mixed = _wave(url, LEAVERS, leaver_tokens)
            last_honest = max(mixed.honest_ends, default=time.monotonic())
            idle = _idle_after(pid, last_honest)
            mixed_cpu, mixed_s = _cpu_seconds(pid) - c0, time.monotonic() - t0
            rss_end = _rss_mb(pid)
            running = httpx.get(f"{url}/health", timeout=5).json()["running"]
    errors = alone.errors + mixed.errors
    per_leaver = max(0.0, mixed_cpu - alone_cpu) / LEAVERS
    growth = 100 * (rss_end - rss_start) / rss_start
    last_leaver = max(mixed.left, default=float("nan")) - last_honest
    holds = {"idle <= 1 s": idle <= 1.0, "RSS within 10%": abs(growth) <= 10,
             f"leaver < {MAX_LEAVER_SHARE:.0%} of a full run": per_leaver < MAX_LEAVER_SHARE * full_cpu,
             "no errors": not errors, "nothing running": running == 0}
    print(f"  a leaver's request run to its end: {full['usage']['completion_tokens']} tokens (max_tokens "
          f"{leaver_tokens}), {full_cpu:.2f} CPU-s in {full_s:.2f} s")
    print(f"  {CLIENTS - LEAVERS} honest alone: {alone_s:.1f} s, {alone_cpu:.2f} CPU-s; with {LEAVERS} leavers: "
          f"{mixed_s:.1f} s, {mixed_cpu:.2f} CPU-s; last leaver left {last_leaver:+.1f} s from the last honest end")
    print(f"  idle {idle:.2f} s after the last honest request; RSS {rss_start:.0f} -> {rss_end:.0f} MB "
          f"({growth:+.1f}%); /health running {running}; errors {len(errors)}"
          + (f" (first: {errors[0]})" if errors else ""))
    print("  targets: " + ", ".join(f"{k}: {'holds' if v else 'FAILS'}" for k, v in holds.items()))
    note = "; ".join(f"{k} {'ok' if v else 'FAILS'}" for k, v in holds.items())
    return [
        {"benchmark": "serve disconnects: CPU idle after last request", "persllm": idle, "baseline": 1.0,
         "unit": "s", "ratio": idle / 1.0, "higher_is_better": False, "baseline_name": "target",
         "note": f"{CLIENTS} streams, {LEAVERS} leave mid-stream; {note}"},
        {"benchmark": "serve disconnects: RSS growth", "persllm": growth, "baseline": 10.0, "unit": "%",
         "ratio": abs(growth) / 10.0, "higher_is_better": False, "baseline_name": "target",
         "note": f"{rss_start:.0f} -> {rss_end:.0f} MB"},
        {"benchmark": "serve disconnects: CPU per abandoned stream", "persllm": per_leaver, "baseline": full_cpu,
         "unit": "s", "ratio": per_leaver / max(full_cpu, 1e-9), "higher_is_better": False,
         "baseline_name": f"the same request run to its end ({full['usage']['completion_tokens']} tokens)",
         "note": f"leavers stay {LEAVE_AFTER} s; errors {len(errors)}"},
    ]
