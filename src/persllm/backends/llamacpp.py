"""In-process llama.cpp for a GGUF file (extra: llamacpp)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from persllm.backends.base import Completion, GenParams, Request, Result, Usage, request_repetition, sequential_many
from persllm.decoding import Repetition, llamacpp_processor
from persllm.errors import BackendError, ConfigError, DependencyError, require

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage

    from persllm.backends.registry import OpenOptions
    from persllm.config import ModelSpec

REBUILD = ('pip cache remove llama_cpp_python && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON '
           '-DGGML_F16C=ON" pip install --force-reinstall --no-deps llama-cpp-python')
_PROBE = ("import sys\nfrom llama_cpp import Llama\n"
          "Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False).create_completion('Hi', max_tokens=1)")


def check_build(path: Path) -> None:
    """Decode one token in a child process before loading in this one: a llama.cpp built for CPU features this
    machine cannot use (AMX in a sandboxed VM) kills its process with SIGSEGV and no message, and with it the
    user's run. The result is remembered per build and model, so the check costs a few seconds once."""
    import llama_cpp

    from persllm.models import persllm_home

    library = Path(llama_cpp.__file__).parent
    build = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in library.rglob("*.so*"))
    key = hashlib.sha256(f"{llama_cpp.__version__}|{build}|{path.resolve()}".encode()).hexdigest()[:16]
    marker = persllm_home() / "llamacpp-checked" / key
    if marker.exists():
        return
    crash = probe_crash([sys.executable, "-c", _PROBE, str(path)])
    if crash:
        raise DependencyError(f"llama-cpp-python died with {crash} decoding one token of {path.name}: its build does "
                              f"not run on this CPU. Rebuild it for AVX2: {REBUILD}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def probe_crash(command: Sequence[str], timeout: float = 300) -> str:
    """The signal that killed `command` ("SIGSEGV"), or "" when it exited by itself (errors are reported by the
    real load, which says more than a child's exit code)."""
    result = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    if result.returncode >= 0:
        return ""
    try:
        return signal.Signals(-result.returncode).name
    except ValueError:
        return f"signal {-result.returncode}"


class LlamaCpp:
    """One GGUF model loaded with llama-cpp-python; requests are served one at a time."""

    concurrency = 1
    in_process = True
    streaming = True
    scoring = False

    def __init__(self, model_path: str | Path, n_ctx: int = 4096, n_threads: int | None = None, seed: int = 0) -> None:
        require("llama_cpp", "llamacpp", "The llama.cpp backend")
        from llama_cpp import Llama

        path = Path(model_path)
        if not path.is_file():
            raise ConfigError(f"GGUF file not found: {path}")
        check_build(path)
        self.name = f"llamacpp:{path.name}"
        self.model_file = path.name  # llama-cpp-python reports the full path as `model`; the file name is the id
        self.usage = Usage()
        self.n_ctx = n_ctx
        self.context_length = n_ctx  # prompt plus answer tokens (what serve checks requests against)
        self.repetition = Repetition()  # anti-repetition default for answers; persllm.variants sets it per model size
        self.own_chat_template = True  # the GGUF's own template (persllm writes one into the files it makes)
        self._lock = threading.Lock()
        self.parameters: int | None = None
        # llama.cpp prints its load log on stderr even with verbose=False in some builds; keep the terminal clean.
        with contextlib.redirect_stderr(io.StringIO()):
            self._llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count() or 2,
                              seed=seed, verbose=False)
        with contextlib.suppress(AttributeError):  # llama-cpp-python internals; the size only picks defaults
            self.parameters = int(self._llm._model.n_params())

    def complete(self, request: Request, params: GenParams = GenParams()) -> Completion:
        """Generate one answer (chat through the GGUF's own template, or raw text)."""
        started = time.monotonic()
        with self._lock:
            try:
                out = self._call(request, params, stream=False)
            except ValueError as exc:  # llama-cpp raises ValueError for prompts longer than the context
                raise BackendError(f"{self.name}: {exc}") from exc
        choice = out["choices"][0]
        text = choice["text"] if isinstance(request, str) else (choice["message"]["content"] or "")
        usage = out.get("usage") or {}
        completion = Completion(text=text, finish_reason=choice.get("finish_reason") or "stop",
                                prompt_tokens=usage.get("prompt_tokens", 0),
                                completion_tokens=usage.get("completion_tokens", 0), model=self.model_file)
        self.usage.add(completion, time.monotonic() - started)
        return completion

    def stream(self, request: Request, params: GenParams = GenParams(),
               cancel: threading.Event | None = None) -> Generator[str, None, Completion]:
        """Yield text pieces as llama.cpp produces them, then return the Completion's accounting. Closing the
        generator stops llama.cpp at once; setting `cancel` ends the answer at the next token (llama-cpp-python
        holds text back, e.g. incomplete UTF-8, so the consumer may not get a piece to close it at)."""
        finish, chunks, pieces = "stop", None, []
        with self._lock:
            try:
                chunks = self._call(request, params, stream=True, cancel=cancel)
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    finish = choice.get("finish_reason") or finish
                    delta = choice.get("delta") or {}
                    piece = choice.get("text") if isinstance(request, str) else delta.get("content")
                    if piece:
                        pieces.append(piece)
                        yield piece
            except ValueError as exc:  # llama-cpp raises ValueError for prompts longer than the context
                raise BackendError(f"{self.name}: {exc}") from exc
            finally:
                if isinstance(chunks, Generator):
                    chunks.close()  # llama.cpp's own generator: no token is decoded after the consumer left
        return Completion(text="".join(pieces), finish_reason=finish, model=self.model_file)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the model's vocabulary."""
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def prompt_tokens(self, request: Request) -> int:
        """Tokens of the prompt, rendered with persllm's chat template (the one persllm's GGUFs embed; another
        GGUF's own template may differ by a few tokens, and llama.cpp still refuses a prompt beyond n_ctx)."""
        from persllm import template

        text = request if isinstance(request, str) else template.render(request, add_generation_prompt=True)
        return self.count_tokens(text)

    def complete_many(self, batch: Sequence[Request], params: GenParams = GenParams()) -> Iterator[Result]:
        """One request after another: llama.cpp in-process serves a single sequence."""
        return sequential_many(self, batch, params)

    def close(self) -> None:
        """Free the model now instead of at interpreter exit (llama-cpp's __del__ can fail then)."""
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            del self._llm  # the attribute goes (not None: it keeps its Llama type); the getattr above allows that

    def _call(self, request: Request, params: GenParams, stream: bool, cancel: threading.Event | None = None) -> Any:
        kwargs: dict[str, Any] = dict(max_tokens=params.max_tokens, temperature=params.temperature,  # noqa: C408
                                      top_p=params.top_p, stop=list(params.stop), stream=stream,
                                      seed=params.seed if params.seed is not None else -1,
                                      repeat_penalty=1.0)  # llama.cpp's own (prompt-counting) penalty is off
        repetition = request_repetition(self, params)
        processors = [llamacpp_processor(repetition)] if repetition.active else []
        if cancel is not None:
            processors.append(_end_when(cancel, self._llm.token_eos()))
        if processors:
            from llama_cpp import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if isinstance(request, str):
            return self._llm.create_completion(request, **kwargs)
        # Each dict is a valid message of llama_cpp's per-role TypedDicts (the role is system, user or assistant and
        # the content a str), which mypy cannot match a dict with a union-typed role against.
        messages = cast("list[ChatCompletionRequestMessage]",
                        [{"role": m.role, "content": m.content} for m in request])
        return self._llm.create_chat_completion(messages=messages, **kwargs)


def _end_when(cancel: threading.Event, eos: int) -> Any:
    """A logits processor that leaves the end-of-sequence token as the only choice once `cancel` is set (the one way
    into create_chat_completion's loop: it takes no stopping criteria)."""
    def process(input_ids: Any, scores: Any) -> Any:
        if cancel.is_set():
            scores[:] = -float("inf")
            scores[eos] = 0.0
        return scores

    return process


def from_spec(spec: ModelSpec, options: OpenOptions) -> LlamaCpp:
    """`llamacpp:PATH` (BACKENDS row)."""
    return LlamaCpp(spec.model, n_ctx=spec.n_ctx, seed=options.seed)


def open_embedded(spec: ModelSpec, options: OpenOptions) -> LlamaCpp:
    """`default`: the embedded Gemma 3 270M GGUF (BACKENDS row)."""
    from persllm.models import embedded_chat_gguf

    return LlamaCpp(embedded_chat_gguf(), n_ctx=spec.n_ctx, seed=options.seed)
