"""`persllm serve`: the official openai client, API keys, 50 concurrent streams, limits, LRU loading, CLI errors."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import MINIMAL_YAML, free_port, wait_for_http, write_project
from persllm import variants
from persllm.backends.base import Completion, GenParams, Request, Result, Usage, sequential_many
from persllm.backends.fake import FakeBackend
from persllm.backends.hf import HFBackend
from persllm.config import Project, load_project
from persllm.decoding import Repetition
from persllm.serve.app import create_app
from persllm.serve.http import key_ok, load_api_keys, serve_in_thread
from persllm.serve.ids import Served, model_entries
from persllm.serve.parse import Limits
from persllm.serve.pool import ModelPool

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # module-wide, see conftest
KEYS = ("key-one", "key-two")


class Echo:
    """Replies '[Analysis] ... [Response] <question> echoed by <persona>', word by word with a pause, so that
    concurrent streams really interleave on the server; records how many streams ran at once."""

    concurrency, in_process, streaming, scoring = 64, False, True, False  # the Backend capabilities
    own_chat_template, parameters, repetition = True, None, Repetition()

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
        words = self.reply(request).split(" ")  # one word = one token, up to max_tokens
        time.sleep(self.delay * min(len(words), params.max_tokens))
        return Completion(text=" ".join(words[:params.max_tokens]), prompt_tokens=3,
                          completion_tokens=min(len(words), params.max_tokens),
                          finish_reason="length" if len(words) > params.max_tokens else "stop")

    def stream(self, request: Request, params: GenParams = GenParams()) -> Iterator[str]:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            for i, word in enumerate(self.reply(request).split(" ")[:params.max_tokens]):
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


# -- hardening: bounded work per request, cancellation, visible-answer stops, OpenAI-shaped errors ---------------------
class Spy:
    """Wraps a transformers backend's model.generate: records its keyword arguments and the tokens each call
    produced, and says whether a call is running; `linger` keeps a call running a while after the model ended (a
    model slow to stop), so /health can be caught counting it."""

    def __init__(self, backend: HFBackend) -> None:
        self.backend, self.calls, self.produced, self.ended, self.linger = backend, [], [], [], 0.0
        self.idle = threading.Event()
        self.idle.set()
        original = backend.model.generate

        def generate(**kwargs: Any) -> Any:
            self.idle.clear()
            self.calls.append(kwargs)
            try:
                out = original(**kwargs)
                self.ended.append(time.monotonic())
                self.produced.append(out.shape[1] - kwargs["input_ids"].shape[1])
                time.sleep(self.linger)
                return out
            finally:
                self.idle.set()

        backend.model.generate = generate  # type: ignore[method-assign]


@contextlib.contextmanager
def tiny_server(project: Project, limits: Limits) -> Iterator[tuple[str, Spy]]:
    """The tiny model served with `limits`, loaded before the first request, its generate spied on."""
    spies: list[Spy] = []

    def opener(project: Project, variant: str) -> HFBackend:
        backend = variants.open_variant(project, variant)
        assert isinstance(backend, HFBackend)
        spies.append(Spy(backend))
        return backend

    app = create_app([project], opener=opener, limits=limits)
    app.state.pool.release(app.state.pool.acquire(app.state.entries["test-person@late:base"]))
    with serve_in_thread(app) as url:
        yield url, spies[0]


@pytest.fixture(scope="module")
def spied(projects: tuple[Project, Project]) -> Iterator[tuple[str, Spy]]:
    with tiny_server(projects[0], Limits(timeout=60)) as served:
        yield served


COMPLETIONS = "/v1/chat/completions"
# Greedy without anti-repetition: the tiny random model loops ("sp sp sp ...") and never ends by itself.
ENDLESS = {"model": "test-person@late:base", "messages": [{"role": "user", "content": "Tell me about the motor"}],
           "temperature": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
LONG = 1800  # max_tokens of a generation that would take seconds


def leave_mid_stream(url: str, body: dict[str, Any], after: float = 0.2,
                     until: Callable[[], bool] = lambda: True) -> float:
    """Stream `body`, wait `after` seconds past the first event and `until` generation is under way, then close the
    connection and return when (the tiny model's text may only come at the end: transformers' streamer holds it back
    until a space)."""
    with httpx.Client(timeout=30) as http, http.stream("POST", url + COMPLETIONS, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: a dropped iterator would close the connection at once
        next(lines)
        time.sleep(after)
        deadline = time.monotonic() + 10
        while not until() and time.monotonic() < deadline:
            time.sleep(0.005)
    return time.monotonic()


def test_a_client_leaving_mid_stream_stops_the_model_within_a_few_tokens(spied: tuple[str, Spy]) -> None:
    url, spy = spied
    spy.linger = 0.5  # the model takes half a second to stop: /health must count it until it has
    try:
        left, running = leave_mid_stream(url, ENDLESS | {"stream": True, "max_tokens": LONG}), []
        while time.monotonic() - left < 10:
            running.append(httpx.get(url + "/health").json()["running"])
            if running[-1] == 0:
                break
            time.sleep(0.02)
        assert running[-1] == 0 and spy.idle.is_set(), "/health said nothing runs while the model still did"
        assert 1 in running  # it did count the abandoned generation while the model was stopping
    finally:
        spy.linger = 0.0
    assert spy.produced[-1] < LONG // 2, f"{spy.produced[-1]} of {LONG} tokens generated for a client that left"
    assert spy.ended[-1] - left < 0.3  # the model stopped within a few tokens (about 650 tokens/s here)

    # A whole answer whose client gives up (read timeout) stops as well.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + COMPLETIONS, json=ENDLESS | {"max_tokens": LONG}, timeout=httpx.Timeout(30, read=0.5))
    assert spy.idle.wait(5) and spy.produced[-1] < LONG // 2


def test_a_timed_out_generation_stops_and_frees_its_slot(projects: tuple[Project, Project]) -> None:
    with tiny_server(projects[0], Limits(timeout=0.5)) as (url, spy):
        late = httpx.post(url + COMPLETIONS, json=ENDLESS | {"max_tokens": LONG}, timeout=30)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        assert spy.idle.wait(5) and spy.produced[-1] < LONG // 2
        events = httpx.post(url + COMPLETIONS, json=ENDLESS | {"max_tokens": LONG, "stream": True}, timeout=30).text
        assert '"code": "timeout"' in events and events.endswith("data: [DONE]\n\n")
        assert spy.idle.wait(5) and spy.produced[-1] < LONG // 2
        assert httpx.get(url + "/health").json()["running"] == 0


def test_prompts_are_counted_in_tokens_against_the_models_context(spied: tuple[str, Spy],
                                                                  projects: tuple[Project, Project]) -> None:
    url, spy = spied
    before = len(spy.calls)
    huge = ENDLESS | {"messages": [{"role": "user", "content": " ".join(["engineering"] * 3000)}]}
    for stream in (False, True):
        refused = httpx.post(url + COMPLETIONS, json=huge | {"stream": stream}, timeout=60)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert {k: error[k] for k in ("type", "param", "code")} == {
            "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}
        assert "maximum context length is 2048 tokens" in error["message"]  # the tiny model's max_position_embeddings
    too_long = httpx.post(url + COMPLETIONS, json=ENDLESS | {"max_tokens": 2040}, timeout=60)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert "in the completion" in too_long.json()["error"]["message"]
    assert len(spy.calls) == before  # the model never ran

    # A server's own cap (--max-context) applies below the model's; the default max_tokens shrinks to what is left.
    with tiny_server(projects[0], Limits(max_context=300)) as (small, _):
        answer = httpx.post(small + COMPLETIONS, json=ENDLESS, timeout=60).json()
        usage = answer["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 300
        assert answer["choices"][0]["finish_reason"] == "length"
        long = ENDLESS | {"messages": [{"role": "user", "content": " ".join(["engineering"] * 400)}]}
        refused = httpx.post(small + COMPLETIONS, json=long, timeout=60).json()["error"]
        assert refused["code"] == "context_length_exceeded" and "is 300 tokens" in refused["message"]


def test_stop_strings_are_bounded_and_matched_on_the_text_never_by_generate(spied: tuple[str, Spy]) -> None:
    from persllm.types import Message

    url, spy = spied
    for bad in (["x" * 129], ["a", "b", "c", "d", "e"], [""], [3]):
        refused = httpx.post(url + COMPLETIONS, json=ENDLESS | {"stop": bad, "max_tokens": 4})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "stop"
    before = len(spy.calls)
    for stream in (False, True):
        fine = httpx.post(url + COMPLETIONS, timeout=60,
                          json=ENDLESS | {"stop": ["x" * 128, "\n", "sp", "s"], "max_tokens": 40, "stream": stream})
        assert fine.status_code == 200
    assert len(spy.calls) == before + 2 and not [kw for kw in spy.calls if "stop_strings" in kw]

    # Other callers (converse, construct) pass their stops to the backend itself: matched on the text there too.
    messages = [Message("user", "Tell me about the motor")]
    params = GenParams(temperature=0.0, max_tokens=40, repetition_penalty=1.0, no_repeat_ngram=0)
    free = spy.backend.complete(messages, params)
    words = free.text.split()
    stop = " " + next(w for w in words[len(words) // 2:] if w.isascii())
    cut = spy.backend.complete(messages, replace(params, stop=(stop,)))
    assert "stop_strings" not in spy.calls[-1] and "stopping_criteria" in spy.calls[-1]
    assert cut.text == free.text.split(stop)[0] and cut.finish_reason == "stop"
    assert cut.completion_tokens < free.completion_tokens  # generation ended at the stop, not at max_tokens


def test_client_stop_strings_apply_to_the_visible_answer_not_the_hidden_analysis(
        server: tuple[str, Echo], projects: tuple[Project, Project]) -> None:
    api = client(server[0])
    hi = [{"role": "user", "content": "Hi"}]

    def ask(**extra: Any) -> Any:
        return api.chat.completions.create(model="echo-person@late", messages=hi, **extra).choices[0]

    whole = ask(stop=["thinking"])  # "thinking" is only in the analysis: the answer is whole
    assert whole.message.content == expected_echo("Hi") and whole.finish_reason == "stop"
    assert streamed(api, "echo-person@late", "Hi", stop=["thinking"])[0] == expected_echo("Hi")
    cut = ask(stop=["echoed"])
    assert cut.message.content == "Hi" and cut.finish_reason == "stop"
    short = ask(stop=["thinking"], max_tokens=8)  # cut by max_tokens; the stop matched in the analysis only
    assert short.message.content == "Hi echoed by" and short.finish_reason == "length"
    chunks = list(api.chat.completions.create(  # type: ignore[call-overload]
        model="echo-person@late", messages=hi, stream=True, stop=["thinking"], max_tokens=8))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    shown = ask(stop=["about"], extra_body={"show_analysis": True})  # shown analysis: stops apply to all of it
    assert shown.message.content == "[Analysis] thinking " and shown.finish_reason == "stop"

    # lm-evaluation-harness's local-chat-completions sends stop ["\n"]; the analysis has newlines, the answer ends.
    fake = FakeBackend(["[Analysis] The question asks for a city.\nNo false premise.\n[Response] Paris.\nAnd more."])
    with serve_in_thread(create_app([projects[1]], opener=lambda p, v: fake)) as url:
        lm_eval = client(url)
        answer = lm_eval.chat.completions.create(  # type: ignore[call-overload]
            model="echo-person@late", messages=hi, stop=["\n"]).choices[0]
        assert answer.message.content == "Paris." and answer.finish_reason == "stop"
        assert streamed(lm_eval, "echo-person@late", "Hi", stop=["\n"])[0] == "Paris."


def test_bad_input_is_a_400_in_openais_shape_never_a_500(server: tuple[str, Echo]) -> None:
    url, auth = server[0], {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"model": "echo-person@late", "messages": [{"role": "user", "content": "Hi"}]}

    def error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
        assert response.status_code == status, response.text
        shape = response.json()["error"]
        assert set(shape) == {"message", "type", "param", "code"} and shape["message"]
        return shape

    refused = [({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed"), ({"max_tokens": 0}, "max_tokens"),
               ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"top_p": 0}, "top_p"),
               ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"tool_choice": "auto"},
               "tool_choice"), ({"functions": [{"name": "f"}]}, "functions"),
               ({"response_format": {"type": "json_object"}}, "response_format"), ({"logprobs": True}, "logprobs"),
               ({"top_logprobs": 3}, "top_logprobs"), ({"n": 2}, "n"), ({"n": True}, "n")]
    for extra, field in refused:
        shape = error(httpx.post(url + COMPLETIONS, json=body | extra, headers=auth))
        assert shape["param"] == field and shape["type"] == "invalid_request_error", (extra, shape)
    harmless = {"seed": 2**63 - 1, "n": 1, "tools": [], "tool_choice": "none", "logprobs": False,
                "response_format": {"type": "text"}, "top_p": 0.5, "stream": None}
    assert httpx.post(url + COMPLETIONS, json=body | harmless, headers=auth).status_code == 200

    surrogate = b'{"model": "echo-person@late", "messages": [{"role": "user", "content": "\\ud800 hi"}]}'
    assert error(httpx.post(url + COMPLETIONS, content=surrogate, headers=auth))["param"] == "messages"
    deep = b"[" * 100_000 + b"]" * 100_000
    error(httpx.post(url + COMPLETIONS, content=deep, headers=auth))
    nested = json.dumps(body | {"metadata": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}})
    assert error(httpx.post(url + COMPLETIONS, content=nested, headers=auth))["param"] == "metadata"

    assert error(httpx.get(url + "/v1/nothing", headers=auth), 404)["code"] == "not_found"
    assert error(httpx.get(url + COMPLETIONS, headers=auth), 405)["code"] == "method_not_allowed"


def test_health_names_model_ids_never_file_paths(spied: tuple[str, Spy], tiny_model: Path) -> None:
    url, _ = spied
    health = httpx.get(url + "/health").json()
    assert set(health["loaded"]) == {"test-person@early:base", "test-person@early", "test-person@late:base",
                                     "test-person@late"}
    assert "/" not in json.dumps(health) and str(tiny_model) not in json.dumps(health)


def test_llamacpp_streams_stop_when_the_client_leaves(projects: tuple[Project, Project], tiny_model: Path,
                                                      tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    import numpy as np
    from llama_cpp import LogitsProcessorList

    from persllm.backends.llamacpp import LlamaCpp
    from persllm.export.gguf import export_gguf

    backend = LlamaCpp(export_gguf(tiny_model, tmp_path / "tiny.gguf", "f16"), n_ctx=2048, n_threads=1)
    llm = backend._llm
    assert llm is not None
    evals: list[float] = []  # when llama.cpp evaluated the prompt, then each generated token
    evaluate = llm.eval
    llm.eval = lambda tokens: (evals.append(time.monotonic()), evaluate(tokens))[1]  # type: ignore[method-assign]
    # The random model emits invalid UTF-8, on which llama-cpp-python's streaming detokenizer is quadratic per token;
    # like a real model's, its text here is kept to printable ASCII tokens (and it never ends by itself).
    pieces = {t: llm.detokenize([t]) for t in range(llm.n_vocab())}  # special tokens (turn ends) spell nothing
    text_ids = [t for t, b in pieces.items() if b and b.isascii() and b.decode().isprintable()]
    mask = np.full(llm.n_vocab(), -np.inf, dtype=np.float32)
    mask[text_ids] = 0.0
    chat = llm.create_chat_completion

    def text_only(**kwargs: Any) -> Any:  # before the backend's own processors, so that a cancel still ends it
        kwargs["logits_processor"] = LogitsProcessorList([lambda ids, scores: scores + mask,
                                                          *(kwargs.get("logits_processor") or [])])
        return chat(**kwargs)

    llm.create_chat_completion = text_only  # type: ignore[method-assign]
    with serve_in_thread(create_app([projects[0]], opener=lambda p, v: backend)) as url:
        left = leave_mid_stream(url, ENDLESS | {"stream": True, "max_tokens": LONG}, 0, lambda: len(evals) > 20)
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(url + "/health").json()["running"] == 0, "llama.cpp kept generating after the client left"
        late = [t for t in evals if t > left]
        assert len(evals) < LONG // 2 and len(late) < 100, f"{len(late)} tokens after the client left"
    backend.close()  # only once stopped: freeing the model under a running generation would crash the process
