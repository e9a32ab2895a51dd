"""Construct throughput against an OpenAI-compatible server with a fixed 200 ms latency: persllm (concurrent
requests) vs the same construct with sequential requests (concurrency 1, what the reference code did)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from persllm.backends.cache import CachedBackend
from persllm.backends.fakeserver import FakeServer
from persllm.backends.openai_compat import OpenAICompatible
from persllm.config import load_project
from persllm.construct import construct
from persllm.ingest import ingest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ada-lovelace"
LATENCY = 0.2
CONCURRENCY = 16


def _measure(concurrency: int, server: FakeServer, workdir: Path) -> tuple[float, int]:
    project = load_project(EXAMPLE, overrides=[f"teacher=openai:scripted@{server.url}",
                                               "construct.max_per_stage=8", "construct.questions_per_passage=2",
                                               "construct.general_per_stage=2"])
    passages, _ = ingest(project)
    teacher = CachedBackend(OpenAICompatible("scripted", base_url=server.url, concurrency=concurrency),
                            workdir / f"cache-{concurrency}.sqlite")  # a fresh cache: every request is real
    started = time.monotonic()
    result = construct(project, passages, teacher)
    seconds = time.monotonic() - started
    teacher.close()
    return seconds, result.stats["teacher_usage"]["requests"]


def run() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp, FakeServer(latency=LATENCY) as server:
        fast_s, fast_n = _measure(CONCURRENCY, server, Path(tmp))
        slow_s, slow_n = _measure(1, server, Path(tmp))
    fast, slow = fast_n / fast_s, slow_n / slow_s
    return [{"benchmark": f"construct requests/s (200 ms server, {CONCURRENCY} in flight)", "persllm": fast,
             "baseline": slow, "unit": "r/s", "ratio": fast / slow, "higher_is_better": True,
             "baseline_name": "sequential requests", "note": f"{fast_n} requests; target >= 8x"}]
