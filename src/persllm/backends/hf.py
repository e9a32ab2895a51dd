"""Local transformers model, optionally with a PEFT adapter, rendered through the model's saved chat template."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from persllm.backends.base import Completion, GenParams, Request, Result, Usage, request_repetition
from persllm.decoding import Repetition, hf_processor, penalize
from persllm.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from persllm.backends.registry import OpenOptions
    from persllm.config import ModelSpec

log = logging.getLogger(__name__)


class HFBackend:
    """A causal LM loaded with transformers; batched generation and log-likelihood scoring on CPU or GPU."""

    concurrency = 1  # one request at a time; many prompts of one call share a batch instead
    in_process = True
    streaming = True
    scoring = True

    def __init__(self, model: str | Path, adapter: str | Path | None = None, device: str | None = None,
                 batch_size: int = 8, name: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from persllm.models import prepare_tokenizer, stop_token_ids

        if adapter and not (Path(adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"adapter not found: {adapter} has no adapter_config.json "
                              "(train it first with `persllm train`)")
        self.name = name or (f"hf:{model}" + (f"+{Path(adapter).name}" if adapter else ""))
        self.usage = Usage()
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tok_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_source))
        # A base model never trained on a chat format gets persllm's template here (or got it when converted from
        # GGUF); prompting it through that template is a strawman baseline, so eval gives it a few-shot prompt.
        self.own_chat_template = has_own_chat_template(self.tokenizer)
        added = prepare_tokenizer(self.tokenizer)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32  # bf16 is ~10x slower on AVX2 CPUs
        self.model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
        # nn.Module attributes are typed Tensor | Module; an input embedding's weight is its [vocab, dim] tensor.
        rows = cast(torch.Tensor, self.model.get_input_embeddings().weight).shape[0]
        if added or len(self.tokenizer) > rows:
            self.model.resize_token_embeddings(len(self.tokenizer))
        if adapter:
            self.model = load_adapter_stack(self.model, Path(adapter))
        # PreTrainedModel.to is wrapped with functools.wraps, which the stubs type as an unbound function (the device
        # would be taken for `self`); it is nn.Module.to, as the stubs say for every other module.
        cast(torch.nn.Module, self.model).to(self.device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._count = token_counter(self.tokenizer)
        # Prompt plus answer tokens the model was built for (None if the config does not say).
        self.context_length: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.parameters: int | None = sum(p.numel() for p in self.model.parameters())
        self.repetition = Repetition()  # anti-repetition default for answers; persllm.variants sets it per model size
        self._lock = threading.Lock()

    # -- generation -----------------------------------------------------------------------------------------
    def render(self, request: Request) -> str:
        """The exact prompt text the model sees."""
        if isinstance(request, str):
            return request
        messages = [{"role": m.role, "content": m.content} for m in request]
        # tokenize=False returns the rendered text; the stub's return type covers every mode (ids, batches, dicts).
        return cast(str, self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the model's vocabulary (no special tokens added)."""
        return self._count(text)

    def prompt_tokens(self, request: Request) -> int:
        """Tokens of the prompt exactly as the model sees it."""
        return self.count_tokens(self.render(request))

    def complete(self, request: Request, params: GenParams = GenParams()) -> Completion:
        """Generate one answer."""
        return self._generate([request], params)[0]

    def complete_many(self, batch: Sequence[Request], params: GenParams = GenParams()) -> Iterator[Result]:
        """Generate in padded batches of `batch_size` (one forward pass serves many prompts)."""
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            try:
                results: list[Completion | BackendError] = list(self._generate(chunk, params))
            except RuntimeError as exc:  # e.g. out of memory: report per item, keep going
                results = [BackendError(f"{self.name}: {exc}") for _ in chunk]
            for offset, result in enumerate(results):
                yield start + offset, result

    def stream(self, request: Request, params: GenParams = GenParams(),
               cancel: threading.Event | None = None) -> Generator[str, None, Completion]:
        """Yield decoded text as tokens are generated (on a worker thread), then return the Completion with its
        accounting. Closing the generator, or setting `cancel`, stops generation after the next token."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = self._encode([self.render(request)])
        width = inputs["input_ids"].shape[1]
        halt = Halt(width, threading.Event(), cancel)
        kwargs = self._gen_kwargs(params, width, halt) | dict(inputs) | {"streamer": streamer}
        errors: list[BaseException] = []

        def run() -> None:
            import torch

            try:
                with self._lock:
                    if params.seed is not None:
                        torch.manual_seed(params.seed)  # sampled streams are reproducible like complete()
                    self.model.generate(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - surfaced to the caller below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pieces = []
        try:
            for piece in streamer:
                if piece:
                    pieces.append(piece)
                    yield piece
        finally:
            # Also when the consumer leaves early (GeneratorExit here): generation ends after its next token
            # instead of running to max_tokens, and the caller only returns once the model is free again.
            halt.stop.set()
            thread.join()
        if errors:
            raise BackendError(f"{self.name}: generation failed: {errors[0]}")
        produced, last = halt.produced, halt.last
        ended = last in self.stop_ids
        return Completion(text="".join(pieces), prompt_tokens=width, completion_tokens=produced - int(ended),
                          finish_reason="stop" if ended or produced < params.max_tokens else "length")

    def close(self) -> None:
        """Drop the model (the attribute goes, so it keeps its loaded type; closing twice is harmless)."""
        if hasattr(self, "model"):
            del self.model

    def _decode(self, ids: list[int]) -> str:
        # One sequence of ids decodes to one string; the stub's str | list[str] also covers a batch of sequences.
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))

    def _encode(self, texts: list[str]) -> Any:
        self.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
        # Rendered chat text already starts with BOS, so no second one is added.
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def _gen_kwargs(self, params: GenParams, prompt_width: int, *criteria: Any) -> dict[str, Any]:
        sample = params.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_tokens, "do_sample": sample,
                                  "eos_token_id": self.stop_ids, "pad_token_id": self.tokenizer.pad_token_id}
        repetition = request_repetition(self, params)
        if repetition.active:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([hf_processor(repetition, prompt_width)])
        if sample:
            kwargs |= {"temperature": params.temperature, "top_p": params.top_p}
        # Stop strings are matched on the decoded text (StopText), never with generate(stop_strings=...): its table
        # grows with vocabulary x stop length and is cached at module level (one 8 KB stop took 17.8 GB at 262k).
        stopping = [*criteria, *([StopText(self.tokenizer, params.stop, prompt_width)] if params.stop else [])]
        if stopping:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(stopping)
        return kwargs

    def _generate(self, batch: Sequence[Request], params: GenParams) -> list[Completion]:
        import torch

        started = time.monotonic()
        inputs = self._encode([self.render(r) for r in batch])
        with self._lock, torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = self.model.generate(**inputs, **self._gen_kwargs(params, inputs["input_ids"].shape[1]))
        prompt_len = inputs["input_ids"].shape[1]
        completions = []
        for row, ids in enumerate(output[:, prompt_len:].tolist()):
            stopped = any(t in self.stop_ids for t in ids)
            ids = ids[: next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))]
            while ids and ids[-1] == self.tokenizer.pad_token_id and len(output) > 1:
                ids.pop()  # a row that stopped (at a stop string) while others went on is padded to their length
                stopped = True
            whole = self._decode(ids)
            text = whole
            for stop in params.stop:
                text = text.split(stop)[0]
            finished = stopped or text != whole or len(ids) < params.max_tokens
            completions.append(Completion(text=text, finish_reason="stop" if finished else "length",
                                          prompt_tokens=int(inputs["attention_mask"][row].sum()),
                                          completion_tokens=len(ids)))
        seconds = (time.monotonic() - started) / max(1, len(batch))
        for completion in completions:
            self.usage.add(completion, seconds)
        return completions

    # -- scoring --------------------------------------------------------------------------------------------
    def score(self, pairs: Sequence[tuple[Request, str]], batch_size: int | None = None) -> list[tuple[float, int]]:
        """Sum of log-probabilities of each continuation after its prompt, and its token count."""
        import torch

        results: list[tuple[float, int]] = []
        size = batch_size or self.batch_size
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            prompts = [self.tokenizer(self.render(p), add_special_tokens=False)["input_ids"] for p, _ in chunk]
            conts = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for _, c in chunk]
            results.extend(self._score_ids(prompts, conts, torch))
        return results

    def _score_ids(self, prompts: list[list[int]], conts: list[list[int]], torch: Any) -> list[tuple[float, int]]:
        pad = self.tokenizer.pad_token_id or 0
        seqs = [p + c for p, c in zip(prompts, conts)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):  # right padding keeps positions aligned with the unpadded sequence
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        # Only positions that predict continuation tokens need logits: with a 262k vocabulary, full logits for a
        # batch would take gigabytes, so the LM head runs on that window alone (transformers' logits_to_keep).
        first = max(0, min(len(p) for p in prompts) - 1)
        window = torch.arange(first, width - 1)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                logits_to_keep=window.to(self.device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out = []
        for i, (p, c) in enumerate(zip(prompts, conts)):
            if not c:
                out.append((0.0, 0))
                continue
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1) - first
            out.append((float(logprobs[i, positions, torch.tensor(c)].sum()), len(c)))
        return out

    def option_logprobs(self, requests: Sequence[Request], options: Sequence[str],
                        prefix: str = "") -> list[list[float]]:
        """Log-probability of each option (e.g. "1".."5") as the answer right after each prompt plus `prefix`.

        All requests run in ONE batched forward that keeps logits for the last two positions only (logits_to_keep=2;
        the 262k-vocabulary head never runs on the rest). The leading tokens the requests share (persona prompt and
        questionnaire instructions) are encoded once and their KV cache is repeated across the batch, so only the
        short differing tails are computed. An option is one token after the prompt, or two when the tokenizer splits
        off a shared first piece (byte-level BPE turns " 2" into "Ġ", "2" but " 1" into "Ġ1"): then that piece is
        appended to the prompt and the option's probability is P(piece) * P(rest | piece).
        """
        import torch

        if not requests:
            return []
        rows, plans = zip(*(self._option_row(self.render(r) + prefix, options) for r in requests))
        with self._lock, torch.inference_mode():
            logits, *_ = self._prefill(list(rows), keep=2)
        logprobs = torch.log_softmax(logits, dim=-1)  # [:, 0] predicts the last row token, [:, 1] the one after it
        return [[sum(float(logprobs[i, pos, tok]) for pos, tok in steps) for steps in plan]
                for i, plan in enumerate(plans)]

    def generate_rows(self, requests: Sequence[Request], temperatures: Sequence[float], max_tokens: int,
                      seed: int | None = None, top_k: int = 50, repetition: Repetition | None = None) -> list[Completion]:
        """Generate for many rows in ONE decoding pass, each row greedy (temperature 0) or sampled at its own one.

        The prompt prefix all rows share (a persona's system prompt) is encoded once and its KV cache repeated, so
        greedy probes and sampled answers of one model cost a single prefill and a single decoding loop on CPU.
        Sampled rows draw from their `top_k` most likely tokens (transformers' default 50: the far tail of a 262k
        vocabulary only adds junk) with one generator seeded with `seed`, so a rerun of the same batch is identical.
        `repetition` (default: the backend's own) is applied to every row as in complete() and stream().
        """
        import torch

        started = time.monotonic()
        rows = [self.tokenizer(self.render(r), add_special_tokens=False)["input_ids"] for r in requests]
        if not rows:
            return []
        temps = torch.tensor([max(0.0, t) for t in temperatures], dtype=torch.float32)
        sampled = temps > 0
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        stops = torch.tensor(self.stop_ids or [-1])
        pad = self.tokenizer.pad_token_id or 0
        produced: list[Any] = []
        repetition = self.repetition if repetition is None else repetition
        answers: list[list[int]] = [[] for _ in rows]
        with self._lock, torch.inference_mode():
            logits, cache, mask, last = self._prefill(rows, keep=1, horizon=max_tokens)
            done = torch.zeros(len(rows), dtype=torch.bool)
            for _ in range(max_tokens):
                step = penalize(logits[:, -1, :], answers, repetition)
                token = step.argmax(-1)
                if bool(sampled.any()):
                    top = torch.topk(step, k=min(top_k, step.shape[-1]), dim=-1)
                    probs = torch.softmax(top.values / temps.clamp(min=1e-5)[:, None], dim=-1)
                    draws = top.indices.gather(1, torch.multinomial(probs, 1, generator=generator)).squeeze(1)
                    token = torch.where(sampled, draws, token)
                token = torch.where(done, torch.full_like(token, pad), token)
                produced.append(token)
                if repetition.active:
                    for row, value in enumerate(token.tolist()):
                        answers[row].append(value)
                done |= torch.isin(token, stops)
                if bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype)], dim=1)
                last = last + 1
                logits = self.model(input_ids=token[:, None].to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=last[:, None].to(self.device), past_key_values=cache,
                                    use_cache=True, logits_to_keep=1).logits.float().cpu()
        return self._completions(rows, produced, max_tokens, started)

    def _completions(self, rows: list[list[int]], produced: list[Any], max_tokens: int,
                     started: float) -> list[Completion]:
        out = []
        columns = [t.tolist() for t in produced]
        for i, row in enumerate(rows):
            ids = [c[i] for c in columns]
            end = next((k for k, t in enumerate(ids) if t in self.stop_ids), None)
            kept = ids if end is None else ids[:end]
            completion = Completion(text=self._decode(kept),
                                    finish_reason="stop" if end is not None or len(ids) < max_tokens else "length",
                                    prompt_tokens=len(row), completion_tokens=len(kept))
            self.usage.add(completion, (time.monotonic() - started) / len(rows))
            out.append(completion)
        return out

    def _prefill(self, rows: list[list[int]], keep: int, horizon: int = 0) -> tuple[Any, Any, Any, Any]:
        """Run token rows that share a prefix: the prefix once (its KV cache repeated), the tails in one batch.

        Tails are left-padded so every row ends in the last column; RoPE positions continue the prefix and skip the
        padding (causality is index-based and pads are masked). Returns the last `keep` logits per row, the cache,
        the attention mask and each row's last position, so a decoding loop can continue from there. `horizon` is
        how many tokens will follow (generation).
        """
        import torch

        shared = _common_prefix(rows)
        shared = shared[: max(0, min(len(shared), min(len(r) for r in rows) - keep))]  # rows keep `keep` own tokens
        window = getattr(self.model.config, "sliding_window", None)
        if window and max(len(r) for r in rows) + horizon >= window:
            # Padding between prefix and tail would count in sliding-window distances; plain left padding is exact.
            shared = []
        tails = [r[len(shared):] for r in rows]
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(t) for t in tails)
        ids = torch.full((len(tails), width), pad, dtype=torch.long)
        tail_mask = torch.zeros((len(tails), width), dtype=torch.long)
        for i, tail in enumerate(tails):
            ids[i, width - len(tail):] = torch.tensor(tail)
            tail_mask[i, width - len(tail):] = 1
        positions = len(shared) + (tail_mask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones((len(tails), len(shared)), dtype=torch.long), tail_mask], dim=1)
        cache = None
        if shared:
            cache = self.model(input_ids=torch.tensor([shared], device=self.device), use_cache=True,
                               logits_to_keep=1).past_key_values
            cache.batch_repeat_interleave(len(tails))
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache, use_cache=True,
                         logits_to_keep=keep)
        return out.logits.float().cpu(), out.past_key_values, mask, positions[:, -1]

    def _option_row(self, text: str, options: Sequence[str]) -> tuple[list[int], list[tuple[tuple[int, int], ...]]]:
        """The tokens to run for one prompt, and for each option the (logit position, token) steps that spell it.

        Tokenizing text+option (not text and option apart) respects merges such as Ġ1 in byte-level BPE.
        """
        encoded = self.tokenizer([text + o for o in options], add_special_tokens=False)["input_ids"]
        context = _common_prefix(encoded)
        tails = [e[len(context):] for e in encoded]
        firsts = [t[0] for t in tails if t]
        if len(tails) >= 2 and all(len(t) == 1 for t in tails) and len(set(firsts)) == len(firsts) and context:
            return context, [((1, t[0]),) for t in tails]
        pieces = {t[0] for t in tails if len(t) == 2}
        singles = [t[0] for t in tails if len(t) == 1]
        seconds = [t[1] for t in tails if len(t) == 2]
        if (context and all(1 <= len(t) <= 2 for t in tails) and len(pieces) == 1 and not pieces & set(singles)
                and len(set(singles)) == len(singles) and len(set(seconds)) == len(seconds)):
            piece = pieces.pop()
            steps: list[tuple[tuple[int, int], ...]] = [((0, t[0]),) if len(t) == 1 else ((0, piece), (1, t[1]))
                                                        for t in tails]
            return context + [piece], steps
        raise BackendError(f"{self.name}: options {list(options)} are not one or two distinct tokens after "
                           f"{text[-40:]!r}; use single-character options such as 1-5")


class Halt:
    """Stopping criterion: every row stops once one of its events is set (checked after each token); it also notes
    how many tokens were generated and the last one, which a streamer does not say."""

    def __init__(self, prompt_width: int, stop: threading.Event, cancel: threading.Event | None = None) -> None:
        self.start, self.stop, self.cancel = prompt_width, stop, cancel
        self.produced, self.last = 0, -1

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.produced, self.last = input_ids.shape[1] - self.start, int(input_ids[0, -1])
        halted = self.stop.is_set() or (self.cancel is not None and self.cancel.is_set())
        return torch.full((input_ids.shape[0],), halted, dtype=torch.bool, device=input_ids.device)


class StopText:
    """Stopping criterion on the text side: a row stops once its new text contains a stop string. Each step decodes
    only the last few tokens of each row (enough to spell the longest stop: a token is at least one byte), so the
    cost grows with the stop's length, not with the vocabulary."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.start = tokenizer, [s for s in stops if s], prompt_width
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=0) + 2

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.start:]
        tails = self.tokenizer.batch_decode(new[:, -self.window:].tolist(), skip_special_tokens=True)
        hits = [any(stop in tail for stop in self.stops) for tail in tails]
        return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)


def _common_prefix(rows: Sequence[Sequence[int]]) -> list[int]:
    """Longest shared leading run of token ids."""
    first = rows[0]
    n = min(len(r) for r in rows)
    for j in range(n):
        if any(r[j] != first[j] for r in rows[1:]):
            return list(first[:j])
    return list(first[:n])


ADAPTER_STACK_FILE = "persllm_adapter.json"


def adapter_stack(adapter: Path) -> list[Path]:
    """Adapters to apply in order: those listed under "stack" in persllm_adapter.json (merged first), then this one.

    DPO trains a fresh LoRA on top of the merged SFT model, so its adapter only makes sense after the SFT adapter;
    the file makes that explicit instead of silently stacking or overwriting (a common SFT->DPO pitfall).
    """
    import json

    meta = adapter / ADAPTER_STACK_FILE
    below: list[Path] = []
    if meta.is_file():
        for rel in json.loads(meta.read_text(encoding="utf-8")).get("stack", []):
            path = (adapter / rel).resolve()
            if not (path / "adapter_config.json").is_file():
                raise ConfigError(f"{adapter} stacks on {path}, which is missing; re-run `persllm train`")
            below.extend(adapter_stack(path))
    return below + [adapter]


def load_adapter_stack(model: Any, adapter: Path) -> Any:
    """Merge every adapter of the stack, bottom first, into the model (inference needs no separate adapter, and an
    unmerged adapter with trainable token rows would rebuild the whole embedding on every forward pass)."""
    return merge_adapters(model, adapter_stack(adapter))


def merge_adapters(model: Any, adapters: Sequence[Path]) -> Any:
    """Merge PEFT adapters into the model in order (each one was trained on the merge of those before it)."""
    from peft import PeftModel

    for path in adapters:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return model


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Token counts from a transformers tokenizer; fast ones through the Rust tokenizer directly, because the
    wrapper's __call__ re-configures padding (a mutation that fails while a streamer decodes on another thread)."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerFast):
        rust = tokenizer.backend_tokenizer
        return lambda text: len(rust.encode(text, add_special_tokens=False).ids)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def has_own_chat_template(tokenizer: Any) -> bool:
    """True if the tokenizer ships a chat template of its own (not none, and not the one persllm adds)."""
    from persllm import template

    current = getattr(tokenizer, "chat_template", None)
    if not current:
        return False
    ours = {template.chat_template(start, end, training=t) for start, end in template.TURN_MARKERS
            for t in (True, False)}
    return current not in ours


def from_spec(spec: ModelSpec, options: OpenOptions) -> HFBackend:
    """`hf:MODEL[+ADAPTER]`, named `options.name` when given (BACKENDS row)."""
    return HFBackend(spec.model, adapter=spec.adapter or None, batch_size=options.batch_size, name=options.name or None)
