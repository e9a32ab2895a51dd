"""Training speed-ups that must not change what is trained: persllm's CPU LM-head kernel against TRL's own, the
length-grouped batches, and resuming with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from persllm.train import _model, _trainer, cpu_head
from persllm.train._trainer import LengthGroupedBatches, row_lengths
from persllm.train.sft import prepare_sft
from test_train import GENERAL, CrashAt, make_project, make_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # module-wide, see conftest
ALL = ("log_probs", "entropy", "mean_logits", "is_top1")


def trl_kernel() -> Any:
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction


def head_inputs(vocab: int = 300, width: int = 12, n: int = 23, bias: bool = False, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, width, generator=gen)
    hidden = torch.randn(n, width, generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    return {"weight": weight, "hidden": hidden, "targets": targets,
            "bias": torch.randn(vocab, generator=gen) if bias else None,
            "grad": torch.randn(n, generator=gen), "grad_entropy": torch.randn(n, generator=gen)}


def run_head(fast: bool, x: dict[str, Any], scale: float, outputs: tuple[str, ...], rows: list[int],
             entropy_loss: bool = False) -> tuple[Any, ...]:
    """Outputs and gradients (hidden, trained rows) of one head call; TRL's sees a dense weight built from the rows."""
    hidden = x["hidden"].clone().requires_grad_()
    index = torch.tensor(rows, dtype=torch.long)
    delta = (x["weight"][index] + 0.5).requires_grad_() if rows else None
    if fast:
        weight = x["weight"].clone()
        if rows:
            weight[index] = delta.detach()
        out = cpu_head.cpu_head(hidden, weight, delta, index if rows else None, x["bias"], x["targets"], scale,
                                64, outputs)
    else:
        weight = x["weight"]
        if rows:
            weight = weight.index_put((index,), torch.zeros(len(rows), weight.shape[1])) + torch.zeros_like(
                weight).index_put((index,), delta)
        out = trl_kernel().apply(hidden, weight, x["bias"], x["targets"], 1.0 / scale, 64, None, 1.0, outputs)
    loss = (out[0] * x["grad"]).sum()
    if entropy_loss:
        loss = loss + (out[1] * x["grad_entropy"]).sum()
    loss.backward()
    return out, hidden.grad, delta.grad if rows else None


def assert_outputs_match(ours: Any, theirs: Any, outputs: tuple[str, ...]) -> None:
    for name, a, b in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"), ours, theirs,
                          strict=True):
        if name not in outputs:
            assert a is None, name
            continue
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (name, (a - b).abs().max())


@pytest.mark.parametrize(("scale", "bias", "outputs", "rows", "tokens"), [
    (1.0, False, ("log_probs", "entropy", "is_top1"), [], 4096),  # SFT's outputs, plain LoRA
    (1.0, False, ("log_probs", "entropy", "is_top1"), [4, 105, 299], 4096),  # trained turn-marker rows
    (0.7, True, ALL, [64, 3], 5),  # DPO's outputs, a bias, a scale, several token tiles
    (2.0, False, ("log_probs",), [17], 4096),
])
def test_cpu_head_matches_trl_kernel(monkeypatch: pytest.MonkeyPatch, scale: float, bias: bool,
                                     outputs: tuple[str, ...], rows: list[int], tokens: int) -> None:
    monkeypatch.setattr(cpu_head, "_HEAD_TOKENS", tokens)
    x = head_inputs(bias=bias)
    x["targets"][:len(rows)] = torch.tensor(rows, dtype=torch.long)  # some tokens predict a trained row
    ours, theirs = run_head(True, x, scale, outputs, rows), run_head(False, x, scale, outputs, rows)
    assert_outputs_match(ours[0], theirs[0], outputs)
    assert torch.allclose(ours[1], theirs[1], atol=1e-5), (ours[1] - theirs[1]).abs().max()
    if rows:
        assert torch.allclose(ours[2], theirs[2], atol=1e-5), (ours[2] - theirs[2]).abs().max()


def test_cpu_head_without_gradients_and_with_an_entropy_loss() -> None:
    x = head_inputs(bias=True)
    with torch.no_grad():  # a reference forward: no E_p[W], the entropy takes its own pass
        ours = cpu_head.cpu_head(x["hidden"], x["weight"], None, None, x["bias"], x["targets"], 1.3, 64, ALL)
        theirs = trl_kernel().apply(x["hidden"], x["weight"], x["bias"], x["targets"], 1.0, 64, None, 1.3, ALL)
    assert_outputs_match(ours, theirs, ALL)
    # an entropy term in the loss goes through TRL's recomputing backward, with the same gradients
    outputs = ("log_probs", "entropy")
    ours, theirs = (run_head(fast, x, 1.0, outputs, [7, 200], entropy_loss=True) for fast in (True, False))
    assert torch.allclose(ours[1], theirs[1], atol=1e-5) and torch.allclose(ours[2], theirs[2], atol=1e-5)


def test_dispatcher_sends_what_it_does_not_cover_to_trl(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl.trainer.utils as trl_utils

    assert _trainer.enable_fast_cpu_loss() and _trainer.fast_cpu_head_active()
    head = trl_utils._ChunkedLogProbFunction
    calls: list[str] = []

    class Spy:
        @staticmethod
        def apply(*args: Any) -> Any:
            calls.append("trl")
            return (None,) * 5

    from trl.kernels.chunked_logprob import _use_triton

    monkeypatch.setattr(head, "apply", staticmethod(_trainer._head_dispatcher(Spy, _use_triton).apply))
    x = head_inputs()
    h, w, t = x["hidden"].requires_grad_(), x["weight"], x["targets"]

    def call(weight: Any = w, softcap: float | None = None, outputs: tuple[str, ...] = ALL, **kw: Any) -> None:
        calls.clear()
        head.apply(h, weight, kw.get("bias"), t, 1.0, 64, softcap, 1.0, outputs)

    call()
    assert calls == []  # a frozen head: persllm's kernel
    call(softcap=30.0)
    assert calls == ["trl"]
    call(outputs=(*ALL, "log_sum_sq_probs"))
    assert calls == ["trl"]
    call(weight=w.clone().requires_grad_())  # a head trained as a whole (full fine-tuning) needs the dense gradient
    assert calls == ["trl"]
    call(weight=w.double())
    assert calls == ["trl"]
    call(bias=torch.zeros(w.shape[0], requires_grad=True))  # a trained bias
    assert calls == ["trl"]


def test_sft_step_matches_trl_kernel(tmp_path: Path, tiny_model: Path) -> None:
    """The whole SFT loss and every trainable gradient (LoRA and the turn-marker rows) are TRL's."""
    import trl.trainer.utils as trl_utils

    project = make_project(tmp_path / "person", tiny_model, "sft.temporal_labels=tokens")
    with _model.session():
        run = prepare_sft(project, make_samples(), GENERAL, tmp_path / "sft")
        trainer, model = run.trainer, run.trainer.model
        head = trl_utils._ChunkedLogProbFunction
        assert getattr(head, _trainer._HEAD_MARK, False)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        model.eval()  # no LoRA dropout: both passes see the same function
        results = []
        try:
            for kernel in (head, head.wrapped):
                trl_utils._ChunkedLogProbFunction = kernel
                model.zero_grad(set_to_none=True)
                loss = trainer.compute_loss(model, dict(batch))
                loss.backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
                results.append((loss.detach(), grads))
        finally:
            trl_utils._ChunkedLogProbFunction = head
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("trainable_tokens_delta" in n for n in grads_a)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4), name


# -- length-grouped batches ------------------------------------------------------------------------------------
def test_length_grouped_batches_pad_less_and_are_reproducible() -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(20, 250, (203,), generator=gen).tolist()
    sampler = LengthGroupedBatches(lengths, batch_size=4, seed=7, group=10)
    first = sampler.order()
    assert sorted(first) == list(range(203)) and first == sampler.order() == list(iter(sampler))
    sampler.set_epoch(1)
    assert sorted(sampler.order()) == list(range(203)) and sampler.order() != first
    assert len(sampler) == 203

    def padding(order: list[int]) -> int:
        batches = [order[i:i + 4] for i in range(0, len(order), 4)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    random_order = torch.randperm(203, generator=gen).tolist()
    assert padding(first) * 4 < padding(random_order)
    # the one short batch (203 = 50 * 4 + 3) is the last, where the loader cuts it
    assert {len(first[i:i + 4]) for i in range(0, 200, 4)} == {4}
    # one record per batch pads nothing: the trainer keeps its own sampler then
    assert row_lengths(type("D", (), {"column_names": ["messages"]})()) is None


def sampler_of(loader: Any) -> Any:
    """The index sampler under accelerate's wrappers."""
    seen = set()
    stack = [loader]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, LengthGroupedBatches):
            return obj
        stack.extend(getattr(obj, name, None) for name in ("sampler", "batch_sampler", "base_dataloader"))
    return None


def test_sft_resume_trains_the_same_batches_across_an_epoch(tmp_path: Path, tiny_model: Path) -> None:
    """Killed in the second epoch and resumed, the run sees exactly the batches an uninterrupted one sees."""

    def train(out: Path, crash: int | None = None) -> tuple[list[list[int]], Any]:
        project = make_project(tmp_path / "person", tiny_model, "sft.max_steps=11", "sft.save_steps=2")
        seen: list[list[int]] = []
        with _model.session():
            run = prepare_sft(project, make_samples(), GENERAL, out, callbacks=[CrashAt(crash)] if crash else [])
            collate = run.trainer.data_collator

            def spy(features: list[dict[str, Any]]) -> Any:
                seen.append([len(f["input_ids"]) * 10_000 + sum(f["input_ids"]) for f in features])
                return collate(features)

            run.trainer.data_collator = spy
            try:
                run.trainer.train(resume_from_checkpoint=run.checkpoint)
            except RuntimeError:
                assert crash is not None
            return seen, sampler_of(run.trainer.get_train_dataloader())

    full, sampler = train(tmp_path / "full")
    assert sampler is not None  # SFT batches come from the length-grouped sampler
    assert len(full) >= 11 and len(sampler) == 15  # 8 batches an epoch: steps 9-11 are in the second epoch
    train(tmp_path / "cut", crash=9)
    resumed, _ = train(tmp_path / "cut")  # resumes from checkpoint-8, the first step of epoch 2
    assert resumed[:3] == full[8:11]


def test_dpo_batches_are_length_grouped(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import TrainerCallback

    from persllm.train.dpo import train_dpo
    from persllm.train.pairs import build_pairs, pairs_by_split
    from persllm.train.sft import train_sft
    from persllm.types import Negative

    class Grab(TrainerCallback):
        sampler: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                           **kwargs: Any) -> None:
            Grab.sampler = sampler_of(train_dataloader)

    project = make_project(tmp_path / "person", tiny_model, "sft.max_steps=1", "dpo.max_steps=2")
    samples = make_samples()
    train_sft(project, samples, GENERAL, tmp_path / "sft")
    negatives = [Negative(f"n{s.id}", s.id, "non_personified", f"As an assistant, turbines spin {s.id}. " * (
        1 + i % 3)) for i, s in enumerate(samples)]
    pairs = pairs_by_split(build_pairs(project, samples, negatives)[0], samples)["train"]
    stats = train_dpo(project, pairs, tmp_path / "sft", tmp_path / "dpo", callbacks=[Grab()])
    assert stats["steps"] == 2 and stats["sanity"]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert isinstance(Grab.sampler, LengthGroupedBatches) and len(Grab.sampler) == stats["pairs"]
