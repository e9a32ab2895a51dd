"""Local transformers model, optionally with a PEFT adapter, rendered through the model's saved chat template."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from persllm.backends.base import Completion, GenParams, Request, Result, Usage
from persllm.errors import BackendError, ConfigError

log = logging.getLogger(__name__)


class HFBackend:
    """A causal LM loaded with transformers; batched generation and log-likelihood scoring on CPU or GPU."""

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
        added = prepare_tokenizer(self.tokenizer)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32  # bf16 is ~10x slower on AVX2 CPUs
        self.model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
        if added or len(self.tokenizer) > self.model.get_input_embeddings().weight.shape[0]:
            self.model.resize_token_embeddings(len(self.tokenizer))
        if adapter:
            self.model = load_adapter_stack(self.model, Path(adapter))
        self.model.to(self.device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._lock = threading.Lock()

    # -- generation -----------------------------------------------------------------------------------------
    def render(self, request: Request) -> str:
        """The exact prompt text the model sees."""
        if isinstance(request, str):
            return request
        messages = [{"role": m.role, "content": m.content} for m in request]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

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

    def stream(self, request: Request, params: GenParams = GenParams()) -> Iterator[str]:
        """Yield decoded text as tokens are generated (generation runs on a worker thread)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = self._encode([self.render(request)])
        kwargs = self._gen_kwargs(params) | dict(inputs) | {"streamer": streamer}
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock:
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if errors:
            raise BackendError(f"{self.name}: generation failed: {errors[0]}")

    def close(self) -> None:
        """Drop the model."""
        self.model = None

    def _encode(self, texts: list[str]) -> Any:
        self.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
        # Rendered chat text already starts with BOS, so no second one is added.
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def _gen_kwargs(self, params: GenParams) -> dict[str, Any]:
        sample = params.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_tokens, "do_sample": sample,
                                  "eos_token_id": self.stop_ids, "pad_token_id": self.tokenizer.pad_token_id}
        if sample:
            kwargs |= {"temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            kwargs |= {"stop_strings": list(params.stop), "tokenizer": self.tokenizer}
        return kwargs

    def _generate(self, batch: Sequence[Request], params: GenParams) -> list[Completion]:
        import torch

        started = time.monotonic()
        inputs = self._encode([self.render(r) for r in batch])
        with self._lock, torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = self.model.generate(**inputs, **self._gen_kwargs(params))
        prompt_len = inputs["input_ids"].shape[1]
        completions = []
        for row, ids in enumerate(output[:, prompt_len:].tolist()):
            stopped = any(t in self.stop_ids for t in ids)
            ids = ids[: next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in params.stop:
                text = text.split(stop)[0]
            finished = stopped or len(ids) < params.max_tokens
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
    """Merge every adapter below `adapter` into the model, then attach `adapter` itself (unmerged)."""
    from peft import PeftModel

    *below, top = adapter_stack(adapter)
    for path in below:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return PeftModel.from_pretrained(model, str(top))

