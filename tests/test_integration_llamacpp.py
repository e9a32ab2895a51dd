"""End to end against the real llama.cpp OpenAI-compatible server running the embedded Gemma 3 270M model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port, wait_for_http

pytest.importorskip("llama_cpp.server", reason="needs persllm[llamacpp]")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llama_server(persllm_home: Path) -> Iterator[str]:
    """`python -m llama_cpp.server` with the embedded model (persllm's chat template embedded) on loopback."""
    import os

    os.environ["PERSLLM_HOME"] = str(persllm_home)
    from persllm.models import embedded_chat_gguf

    model = embedded_chat_gguf()
    port = free_port()
    log = open(persllm_home / "llama_server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--model_alias", "gemma-270m"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        if wait_for_http(f"{url}/models", proc, timeout=120) is None:
            raise RuntimeError("llama_cpp.server did not start within 120 s: "
                               + (persllm_home / "llama_server.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_construct_step_through_the_openai_compatible_backend(llama_server: str, project_dir: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "persllm", "construct", str(project_dir), "--output", str(out),
           "--set", f"teacher=openai:gemma-270m@{llama_server}", "--set", "teacher.concurrency=1",
           "--set", "construct.mode=grounded", "--set", "construct.max_per_stage=4",
           "--set", "construct.questions_per_passage=2", "--set", "construct.general_per_stage=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "construct" / "stats.json").read_text())
    usage = stats["teacher_usage"]
    assert usage["requests"] > 0 and usage["completion_tokens"] > 0 and usage["failures"] == 0
    assert stats["teacher"].startswith("openai:gemma-270m@http://127.0.0.1")
    samples = [json.loads(line) for line in (out / "construct" / "samples.jsonl").read_text().splitlines()]
    assert {s["kind"] for s in samples} >= {"ordinary", "opinion", "induced"}
    assert all(s["analysis"] and s["response"] and s["question"] for s in samples)
    # each small-model output was either accepted or rejected for a named reason: nothing unaccounted for
    accepted = sum(stats["accepted"].values())
    assert accepted + sum(stats["rejected"].values()) >= usage["requests"]


def test_chat_completion_uses_persllms_template(llama_server: str) -> None:
    from persllm.backends.openai_compat import OpenAICompatible
    from persllm.types import Message

    backend = OpenAICompatible("gemma-270m", base_url=llama_server, timeout=60)
    backend.check()
    completion = backend.complete([Message("system", "You are Ada."), Message("user", "Hello!")])
    assert completion.prompt_tokens > 5 and completion.finish_reason in ("stop", "length")
    pieces = list(backend.stream([Message("user", "Say something.")]))
    assert pieces
