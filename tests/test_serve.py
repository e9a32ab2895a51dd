"""`persllm serve`: the official openai client, API keys, 50 concurrent streams, limits, LRU loading, CLI errors."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MINIMAL_YAML, free_port, wait_for_http, write_project

from persllm import variants
from persllm.backends.base import Completion, GenParams, Request, Result, Usage, sequential_many
from persllm.config import Project, load_project
from persllm.serve import Limits, ModelPool, Served, create_app, key_ok, load_api_keys, model_entries, serve_in_thread

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # module-wide, see conftest
KEYS = ("key-one", "key-two")


class Echo:
    """Replies '[Analysis] ... [Response] <question> echoed by <persona>', word by word with a pause, so that
    concurrent streams really interleave on the server; records how many streams ran at once."""

    def __init__(self, delay: float = 0.01) -> None:
        self.name, self.usage, self.delay = "echo", Usage(), delay
        self.active = self.peak = 0
        self.closed = False
        self._lock = threading.Lock()

    def reply(self, request: Request) -> str:
        assert not isinstance(request, str)
        persona = request[0].content.split(".")[0]  # "You are Echo Person": the system prompt persllm built
        return f"[Analysis] thinking about {request[-1].content} [Response] {request[-1].content} echoed by {persona}"

    def complete(self, request: Request, params: GenParams = GenParams()) -> Completion:
        text = self.reply(request)
        time.sleep(self.delay * len(text.split()))
        return Completion(text=text, prompt_tokens=3, completion_tokens=len(text.split()))

    def stream(self, request: Request, params: GenParams = GenParams()) -> Iterator[str]:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            for i, word in enumerate(self.reply(request).split(" ")):
                time.sleep(self.delay)
                yield word if i == 0 else " " + word
        finally:
            with self._lock:
                self.active -= 1

    def complete_many(self, batch: Sequence[Request], params: GenParams = GenParams()) -> Iterator[Result]:
        return sequential_many(self, batch, params)

    def close(self) -> None:
        self.closed = True


def expected_echo(question: str) -> str:
    return f"{question} echoed by You are Echo Person"


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Project, Project]:
    root = tmp_path_factory.mktemp("serve")
    tiny = load_project(write_project(root / "person"), overrides=[f"base_model=hf:{tiny_model}"])
    echo = load_project(write_project(root / "echo", MINIMAL_YAML.replace("Test Person", "Echo Person")))
    return tiny, echo


@pytest.fixture(scope="module")
def server(projects: tuple[Project, Project]) -> Iterator[tuple[str, Echo]]:
    echo = Echo()

    def opener(project: Project, variant: str):  # type: ignore[no-untyped-def]
        return echo if project.slug == "echo-person" else variants.open_variant(project, variant)

    app = create_app(list(projects), api_keys=KEYS, opener=opener,
                     limits=Limits(max_concurrency=16, max_queue=64, timeout=120))
    with serve_in_thread(app) as url:
        yield url, echo


def client(url: str, key: str = KEYS[1]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def streamed(api: openai.OpenAI, model: str, question: str, **extra: object) -> tuple[str, set[str]]:
    """The concatenated deltas of a streamed answer and the chunk ids seen."""
    stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                         stream=True, **extra)  # type: ignore[call-overload]
    pieces, ids = [], set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces), ids


def test_openai_client_lists_models_and_completes_normally_and_streamed(server: tuple[str, Echo]) -> None:
    url, _ = server
    api = client(url)
    ids = {m.id for m in api.models.list()}
    assert {"test-person@early:base", "test-person@late:base", "test-person@late", "echo-person@early"} <= ids
    assert api.models.retrieve("test-person@late").id == "test-person@late"

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Where were you born?"}]
    normal = api.chat.completions.create(model="test-person@late:base", messages=messages,  # type: ignore[arg-type]
                                         max_tokens=6, temperature=0, extra_body={"show_analysis": True})
    choice = normal.choices[0]
    assert normal.object == "chat.completion" and normal.model == "test-person@late:base"
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason in ("stop", "length")
    assert normal.usage is not None and normal.usage.prompt_tokens > 20 and 0 < normal.usage.completion_tokens <= 6

    stream = api.chat.completions.create(model="test-person@late:base", messages=messages,  # type: ignore[arg-type]
                                         max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"show_analysis": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 20
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the stream says exactly what the whole answer said


def test_analysis_hidden_unless_asked_and_persona_prompt_wins(server: tuple[str, Echo]) -> None:
    api = client(server[0])
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}]
    hidden = api.chat.completions.create(model="echo-person@late", messages=messages)  # type: ignore[arg-type]
    assert hidden.choices[0].message.content == expected_echo("Hi")  # client system message ignored, no analysis
    shown = api.chat.completions.create(model="echo-person@late", messages=messages,  # type: ignore[arg-type]
                                        extra_body={"show_analysis": True})
    assert shown.choices[0].message.content.startswith("[Analysis] thinking about Hi [Response]")  # type: ignore[union-attr]
    assert streamed(api, "echo-person@late", "Hi")[0] == expected_echo("Hi")
    assert streamed(api, "echo-person@late", "Hi", extra_body={"show_analysis": True})[0].startswith("[Analysis]")
    assert streamed(api, "echo-person@late", "Hi", stop=["echoed"])[0] == "Hi "  # stop strings cut the stream


def test_persllms_own_openai_backend_talks_to_the_server(server: tuple[str, Echo],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from persllm.backends.openai_compat import OpenAICompatible
    from persllm.types import Message

    monkeypatch.setenv("SERVE_TEST_KEY", KEYS[0])
    backend = OpenAICompatible("echo-person@early", base_url=f"{server[0]}/v1", api_key_env="SERVE_TEST_KEY")
    try:
        backend.check()
        assert backend.complete([Message("user", "Hello")]).text == expected_echo("Hello")
        assert "".join(backend.stream([Message("user", "Hello")])) == expected_echo("Hello")
    finally:
        backend.close()


def test_requests_without_a_valid_key_get_401(server: tuple[str, Echo]) -> None:
    url, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong-key").models.list()
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEYS[0]}"}):
        response = httpx.post(f"{url}/v1/chat/completions", headers=headers,
                              json={"model": "echo-person@late", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # health needs no key
    assert client(url, KEYS[0]).models.list().data


def test_50_concurrent_streams_on_the_tiny_model_are_not_mixed_up(server: tuple[str, Echo]) -> None:
    api = client(server[0])
    questions = [f"Tell me about the motor number {i} and the factory in {1900 + i}" for i in range(50)]
    settings = {"max_tokens": 6, "temperature": 0, "extra_body": {"show_analysis": True}}

    def whole(question: str) -> str:
        answer = api.chat.completions.create(model="test-person@late:base",  # type: ignore[call-overload]
                                             messages=[{"role": "user", "content": question}], **settings)
        return answer.choices[0].message.content

    expected = [whole(q) for q in questions]
    # Greedy answers differ between prompts, so a stream carrying another request's text would be caught.
    assert len(set(expected)) >= 10
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda q: streamed(api, "test-person@late:base", q, **settings), questions))
    assert [text for text, _ in results] == expected
    assert all(len(ids) == 1 for _, ids in results) and len({next(iter(ids)) for _, ids in results}) == 50


def test_50_concurrent_interleaved_streams_each_carry_their_own_text(server: tuple[str, Echo]) -> None:
    url, echo = server
    api = client(url)
    questions = [f"marker-{i:02d}" for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda q: streamed(api, "echo-person@early", q)[0], questions))
    assert results == [expected_echo(q) for q in questions]
    assert echo.peak > 4  # the streams really ran at the same time


def test_queue_full_timeout_body_limit_and_bad_requests(projects: tuple[Project, Project]) -> None:
    slow = Echo(delay=0.3)  # 11 words: about 3.3 s per answer
    app = create_app([projects[1]], opener=lambda p, v: slow,
                     limits=Limits(max_concurrency=1, max_queue=0, timeout=0.5, max_body=2000))
    body = {"model": "echo-person@late", "messages": [{"role": "user", "content": "slow"}]}
    with serve_in_thread(app) as url:
        assert httpx.post(f"{url}/v1/chat/completions", content=b"{" + b" " * 5000 + b"}").status_code == 413
        bad = httpx.post(f"{url}/v1/chat/completions", json=body | {"model": "nobody@late"})
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
        no_user = body | {"messages": [{"role": "assistant", "content": "hello"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=no_user).status_code == 400
        assert httpx.post(f"{url}/v1/chat/completions", json=body | {"max_tokens": 10**6}).status_code == 400
        for bad_setting in ({"repetition_penalty": 0.5}, {"no_repeat_ngram_size": -1}, {"no_repeat_ngram_size": 2.5}):
            refused = httpx.post(f"{url}/v1/chat/completions", json=body | bad_setting)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == next(iter(bad_setting))
        late = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        # The timed-out generation still occupies the only slot, and the queue holds nobody: refused at once.
        busy = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/health").json()["running"] == 1


def test_model_pool_loads_lazily_shares_weights_and_evicts_least_recently_used(
        projects: tuple[Project, Project]) -> None:
    opened: list[tuple[str, str]] = []

    def opener(project: Project, variant: str) -> Echo:
        opened.append((project.slug, variant))
        return Echo()

    tiny, echo = projects
    entries = model_entries([tiny, Served(echo, stage="late", variant="fake")])
    assert set(entries) == {"test-person@early:base", "test-person@early", "test-person@late:base",
                            "test-person@late", "echo-person@late:fake", "echo-person@late"}
    pool = ModelPool(opener, capacity=1)
    first = pool.acquire(entries["test-person@early"])
    pool.release(pool.acquire(entries["test-person@late:base"]))  # another stage, same weights: no second load
    assert opened == [("test-person", "base")]
    other = pool.acquire(entries["echo-person@late"])  # over capacity, but the first is still in use: kept
    assert not first.backend.closed  # type: ignore[attr-defined]
    pool.release(first)
    assert first.backend.closed and pool.loaded() == [other.key]  # type: ignore[attr-defined]


def test_api_keys_from_file_and_environment(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# team keys\nalpha\n\nbeta\n")
    keys = load_api_keys(tmp_path / "keys", {"PERSLLM_API_KEYS": "gamma, alpha"})
    assert keys == ("gamma", "alpha", "beta")
    assert key_ok(keys, "Bearer beta") and not key_ok(keys, "Bearer bet") and not key_ok(keys, None)
    assert key_ok((), None)


def persllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "persllm", *args], check=False, capture_output=True, text=True, timeout=120)


def test_serve_cli_errors_and_startup(project_dir: Path, tmp_path: Path) -> None:
    missing = persllm("serve", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no persona.yaml found" in missing.stderr
    stage = persllm("serve", f"{project_dir}@middle")
    assert stage.returncode == 1 and "unknown stage 'middle'" in stage.stderr and "early, late" in stage.stderr
    adapter = persllm("serve", f"{project_dir}:dpo")
    assert adapter.returncode == 1 and "no DPO adapter" in adapter.stderr and "persllm train" in adapter.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        busy = persllm("serve", str(project_dir), "--port", port)
    assert busy.returncode == 1 and f"127.0.0.1:{port}" in busy.stderr and "in use" in busy.stderr
    port = str(free_port())
    process = subprocess.Popen([sys.executable, "-m", "persllm", "serve", str(project_dir), "--port", port],
                               env={**__import__("os").environ, "PERSLLM_API_KEYS": "cli-key"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for_http(f"{url}/health", process, timeout=60) is not None, process.stderr.read()
        ids = [m.id for m in client(url, "cli-key").models.list()]
        assert ids == ["test-person@early:base", "test-person@early", "test-person@late:base", "test-person@late"]
        assert httpx.get(f"{url}/v1/models").status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=30)
