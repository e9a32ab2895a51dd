"""Training with a tiny random Gemma3: masking, time tokens, SFT, SFT -> DPO stacking, sanity alarm, resume, patch."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from conftest import write_project
from persllm import template
from persllm.config import load_project
from persllm.errors import ConfigError, PersllmError
from persllm.progress import Progress, Task
from persllm.train import _model, _trainer
from persllm.train.data import sample_messages, sample_prompt, to_chat
from persllm.train.dpo import train_dpo
from persllm.train.pairs import build_pairs, pairs_by_split
from persllm.train.prefs import preference_accuracy
from persllm.train.sft import prepare_sft, train_sft
from persllm.types import Message, Negative, PreferencePair, Sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # module-wide, see conftest
STAGES = ("early", "late")


def make_samples(n: int = 8) -> list[Sample]:
    """Alternating-stage samples; the last quarter is held out."""
    samples = []
    for i in range(n):
        stage = STAGES[i % 2]
        samples.append(Sample(
            id=f"s{i}", persona="test-person", stage=stage, time_label="1900" if stage == "early" else "1930",
            kind="induced" if i % 3 == 2 else "ordinary", question=f"What did you build in the workshop in {1890 + i}?",
            analysis=f"The question is about my work in {1890 + i}, so I answer from what I know.",
            response=f"I built a small steam turbine, number {i}, with my friend Otto.", seed_id=f"p{i}",
            split="train" if i < n * 3 // 4 else "test"))
    return samples


GENERAL = [
    [Message("user", "Give me three tips for a good night of sleep."),
     Message("assistant", "Sleep early, avoid coffee, keep the room dark."),
     Message("user", "And one more?"),
     Message("assistant", "Put the phone away an hour before bed.")],
    [Message("user", "Explain how an electric motor works."),
     Message("assistant", "A current in a coil makes a magnetic field that turns the rotor.")],
]


def make_project(root: Path, tiny_model: Path, *overrides: str) -> Any:
    project_dir = write_project(root)
    base = [f"base_model=hf:{tiny_model}", "sft.batch_size=2", "sft.max_steps=4", "sft.repeat=2",
            "sft.learning_rate=0.001", "sft.general_ratio=0.25", "dpo.batch_size=2", "dpo.max_steps=4"]
    return load_project(project_dir, overrides=[*base, *overrides])


class ParamWatch(TrainerCallback):
    """Records which trainable parameters changed between the start and the end of training."""

    def __init__(self) -> None:
        self.changed: dict[str, bool] = {}
        self.first_step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.first_step = state.global_step
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.changed = {n: not torch.equal(self.before[n], p.detach())
                        for n, p in model.named_parameters() if p.requires_grad}


class CrashAt(TrainerCallback):
    """Simulates a killed run: raises once the optimizer step `step` is done (before it is checkpointed)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {state.global_step}")


class RecordingProgress(Progress):
    """Progress that remembers each task's total and how far it advanced."""

    def __init__(self) -> None:
        self.tasks: list[dict[str, Any]] = []

    def task(self, description: str, total: int | None = None) -> Task:
        record = {"description": description, "total": total, "done": 0}
        self.tasks.append(record)

        class _Task(Task):
            def advance(self, n: int = 1) -> None:
                record["done"] += n

        return _Task()


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# -- module fixtures: one SFT run in time-token mode, one DPO run on top of it ---------------------------------
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sft-run")
    project = make_project(root / "person", tiny_model, "sft.temporal_labels=tokens")
    samples = make_samples()
    watch, progress = ParamWatch(), RecordingProgress()
    stats = train_sft(project, samples, GENERAL, root / "out" / "sft", progress=progress, callbacks=[watch])
    return {"project": project, "samples": samples, "stats": stats, "watch": watch, "progress": progress,
            "dir": root / "out" / "sft"}


@pytest.fixture(scope="module")
def dpo_run(sft_run: dict[str, Any]) -> dict[str, Any]:
    project, samples = sft_run["project"], sft_run["samples"]
    negatives = [Negative(f"n{s.id}", s.id, "other_stage",
                          f"Ich bin ein beruehmter Erfinder in Berlin mit einer Fabrik, {s.stage} {s.id}.")
                 for s in samples]
    pairs, _ = build_pairs(project, samples, negatives)
    split = pairs_by_split(pairs, samples)
    sft_before = tree_digest(sft_run["dir"] / "adapter")
    project.dpo.learning_rate = 5e-3
    out = sft_run["dir"].parent / "dpo"
    stats = train_dpo(project, split["train"], sft_run["dir"], out)
    return {"stats": stats, "dir": out, "split": split, "sft_before": sft_before}


# -- tests -----------------------------------------------------------------------------------------------------
def test_sft_changes_every_trainable_parameter_and_writes_outputs(sft_run: dict[str, Any]) -> None:
    watch, stats, out = sft_run["watch"], sft_run["stats"], sft_run["dir"]
    assert watch.changed and all(watch.changed.values()), [n for n, c in watch.changed.items() if not c]
    assert any("trainable_tokens_delta" in n for n in watch.changed)  # the time-token rows were trained
    assert any("lora_A" in n for n in watch.changed) and any("lora_B" in n for n in watch.changed)
    assert stats["steps"] == 4 and stats["fast_cpu_loss"] is True and stats["tokens"] > 0
    assert stats["samples"]["personified"] == 12 and stats["samples"]["general"] == 3
    adapter = out / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
                 "chat_template.jinja", "persllm_adapter.json"):
        assert (adapter / name).is_file(), name
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert not any(k.endswith("embed_tokens.weight") for k in keys)  # no 262k-row embedding copies
    assert any("trainable_tokens_delta" in k for k in keys)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "learning_rate", "grad_norm"} <= set(r) for r in rows)
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke == stats["smoke"] and len(smoke["outputs"]) == 3
    assert stats["smoke_warning"] is (not smoke["ok"])
    assert not (out / "checkpoints").exists()
    assert sft_run["progress"].tasks == [{"description": "SFT", "total": 4, "done": 4}]


def test_time_tokens_and_template_match_between_training_and_inference(sft_run: dict[str, Any], tiny_model: Path,
                                                                      tmp_path: Path) -> None:
    from persllm.backends.hf import HFBackend

    project, samples = sft_run["project"], sft_run["samples"]
    run = prepare_sft(project, samples, GENERAL, tmp_path / "sft")
    tokenizer = run.tokenizer
    ids = tokenizer.convert_tokens_to_ids([template.time_token(0), template.time_token(1)])
    assert ids == [512, 513] and len(tokenizer) == 514  # one token per stage, after the 512 base tokens
    assert run.trainer.model.get_input_embeddings().weight.shape[0] == 514
    assert tokenizer(f"{template.time_token(1)} Hello", add_special_tokens=False)["input_ids"][0] == 513

    backend = HFBackend(str(tiny_model), adapter=sft_run["dir"] / "adapter")
    assert backend.model.get_input_embeddings().weight.shape[0] == len(backend.tokenizer) == 514
    sample = samples[1]  # a late-stage sample: <TIME-II>
    messages = sample_messages(project, sample)
    rendered = template.render(messages, bos=tokenizer.bos_token)
    rows = [r for r in run.trainer.train_dataset if r["messages"] == to_chat(messages)]
    assert rows, "the sample is not in the prepared training data"
    train_ids = rows[0]["input_ids"]
    assert tokenizer.decode(train_ids) == rendered  # TRL's processing renders exactly template.render
    assert 513 in train_ids and 512 not in train_ids
    prompt = sample_prompt(project, sample)
    served = backend.render(prompt)
    assert served == template.render(prompt, bos=tokenizer.bos_token, add_generation_prompt=True)
    served_ids = backend.tokenizer(served, add_special_tokens=False)["input_ids"]
    assert train_ids[: len(served_ids)] == served_ids  # token-identical prompt at inference


def test_assistant_only_masking_is_exact(sft_run: dict[str, Any], tmp_path: Path) -> None:
    run = prepare_sft(sft_run["project"], sft_run["samples"], GENERAL, tmp_path / "sft")
    tokenizer = run.tokenizer
    end = template.TURN_MARKERS[0][1]
    checked_two_turns = False
    for row in run.trainer.train_dataset:
        messages = row["messages"]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        assert encoded["input_ids"] == row["input_ids"]
        spans, cursor = [], 0
        for message in messages:
            if message["role"] != "assistant":
                continue
            header = f"{template.TURN_MARKERS[0][0]}assistant\n"
            start = rendered.index(header + message["content"], cursor) + len(header)
            stop = start + len(message["content"]) + len(end)
            assert rendered[stop - len(end):stop] == end
            spans.append((start, stop))
            cursor = stop
        expected = [any(a <= s and e <= b for a, b in spans) for s, e in encoded["offset_mapping"]]
        labelled = [label != -100 for label in row["labels"]]
        assert labelled == expected
        labelled_text = tokenizer.decode([t for t, keep in zip(row["input_ids"], labelled, strict=True) if keep])
        wanted = "".join(m["content"] + end for m in messages if m["role"] == "assistant")
        assert labelled_text == wanted  # system, user and turn headers carry no loss
        checked_two_turns |= sum(m["role"] == "assistant" for m in messages) == 2
    assert checked_two_turns


def test_sft_then_dpo_keeps_sft_adapter_and_stacks(sft_run: dict[str, Any], dpo_run: dict[str, Any],
                                                    tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.backends.base import GenParams
    from persllm.backends.hf import HFBackend, adapter_stack

    sft_adapter, dpo_adapter = sft_run["dir"] / "adapter", dpo_run["dir"] / "adapter"
    assert tree_digest(sft_adapter) == dpo_run["sft_before"]  # SFT adapter byte-identical after DPO
    meta = json.loads((dpo_adapter / "persllm_adapter.json").read_text())
    assert meta["stack"] == ["../../sft/adapter"] and meta["base"] == str(tiny_model)
    assert adapter_stack(dpo_adapter) == [sft_adapter.resolve(), dpo_adapter]
    stats = dpo_run["stats"]
    assert stats["sanity"]["loss"] == pytest.approx(0.693147, abs=1e-4)  # fresh adapter: policy == reference
    assert stats["steps"] == 4 and stats["reward_margin"] > 0
    rows = [json.loads(line) for line in (dpo_run["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/margins" in r and "rewards/accuracies" in r for r in rows)

    backend = HFBackend(str(tiny_model), adapter=dpo_adapter)
    prompt = list(dpo_run["split"]["train"][0].prompt)
    completion = backend.complete(prompt, GenParams(temperature=0, max_tokens=8))
    assert completion.completion_tokens > 0
    # The stack is base -> merged SFT -> DPO adapter: compare with composing it by hand, and without the SFT.
    tokenizer = AutoTokenizer.from_pretrained(str(dpo_adapter))
    ids = torch.tensor([tokenizer(backend.render(prompt), add_special_tokens=False)["input_ids"]])

    def compose(with_sft: bool) -> Any:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
        model.resize_token_embeddings(len(tokenizer))
        if with_sft:
            model = PeftModel.from_pretrained(model, str(sft_adapter)).merge_and_unload()
        return PeftModel.from_pretrained(model, str(dpo_adapter)).eval()

    with torch.no_grad():
        served = backend.model(input_ids=ids).logits
        manual = compose(True)(input_ids=ids).logits
        no_sft = compose(False)(input_ids=ids).logits
    assert torch.allclose(served, manual, atol=1e-4)
    assert not torch.allclose(served, no_sft, atol=1e-3)


def test_dpo_raises_preference_accuracy_on_its_pairs(sft_run: dict[str, Any], dpo_run: dict[str, Any],
                                                     tiny_model: Path) -> None:
    pairs = dpo_run["split"]["train"]
    sft = preference_accuracy(str(tiny_model), sft_run["dir"] / "adapter", pairs)
    dpo = preference_accuracy(str(tiny_model), dpo_run["dir"] / "adapter", pairs)
    assert sft["pairs"] == dpo["pairs"] == len(pairs)
    assert dpo["mean_margin"] > sft["mean_margin"]
    assert dpo["accuracy"] >= sft["accuracy"] and dpo["accuracy"] == 1.0


def _chosen_logps(base: Path, adapter: Path, pairs: list[PreferencePair]) -> float:
    """Mean summed log-probability of the chosen answers (with their end marker) under base + adapter stack."""
    from persllm.backends.hf import HFBackend
    from persllm.train._trainer import end_of_turn

    backend = HFBackend(str(base), adapter=adapter)
    try:
        end = end_of_turn(backend.tokenizer)
        scores = backend.score([(list(p.prompt), p.chosen + end) for p in pairs])
    finally:
        backend.close()
    return sum(total for total, _ in scores) / len(scores)


def test_dpo_sft_weight_keeps_the_chosen_answers_likely(sft_run: dict[str, Any], dpo_run: dict[str, Any],
                                                        tiny_model: Path) -> None:
    project = copy.deepcopy(sft_run["project"])
    project.dpo.sft_weight = 1.0
    pairs = dpo_run["split"]["train"]
    out = dpo_run["dir"].parent / "dpo-rpo"
    stats = train_dpo(project, pairs, sft_run["dir"], out)
    assert stats["steps"] == project.dpo.max_steps
    plain = _chosen_logps(tiny_model, dpo_run["dir"] / "adapter", pairs)
    rpo = _chosen_logps(tiny_model, out / "adapter", pairs)
    assert rpo > plain + 1.0, (rpo, plain)


def test_dpo_with_identical_pairs_is_stopped(sft_run: dict[str, Any], tmp_path: Path) -> None:
    project, samples = sft_run["project"], sft_run["samples"]
    prompt = tuple(sample_prompt(project, samples[0]))
    same = "[Analysis] I think so.\n[Response] Yes."
    pairs = [PreferencePair(f"p{i}", samples[0].id, "other_stage", prompt, same, same) for i in range(4)]
    with pytest.raises(PersllmError, match="identical to the rejected one.*no gradient"):
        train_dpo(project, pairs, sft_run["dir"], tmp_path / "dpo")
    assert not (tmp_path / "dpo" / "adapter").exists()


def test_killed_training_resumes_from_last_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    project = make_project(tmp_path / "person", tiny_model, "sft.max_steps=5", "sft.save_steps=2")
    samples, out = make_samples(), tmp_path / "sft"
    with pytest.raises(RuntimeError, match="simulated crash at step 3"):
        train_sft(project, samples, GENERAL, out, callbacks=[CrashAt(3)])
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "checkpoints" / "checkpoint-3").exists() and not (out / "adapter").exists()

    watch, progress = ParamWatch(), RecordingProgress()
    stats = train_sft(project, samples, GENERAL, out, progress=progress, callbacks=[watch])
    assert watch.first_step == 2 and stats["resumed_from_step"] == 2 and stats["steps"] == 5
    assert progress.tasks == [{"description": "SFT", "total": 5, "done": 5}]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # curves include the steps before the crash
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_fast_cpu_loss_patch_is_applied_and_scores_only_labels(tmp_path: Path, tiny_model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", kernel._use_triton)  # start unpatched whatever ran before
    assert not _trainer.fast_cpu_loss_active()
    project = make_project(tmp_path / "person", tiny_model)
    run = prepare_sft(project, make_samples(), GENERAL, tmp_path / "sft")
    assert run.fast and _trainer.fast_cpu_loss_active()
    assert trl_utils._use_triton(torch.device("cpu")) is True

    rows: list[int] = []
    original = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden: torch.Tensor, *args: Any) -> Any:
        rows.append(hidden.shape[0])
        return original(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    trainer = run.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        trainer.model(**batch, fused_lm_head=True)
    scored = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [scored] and scored < batch["labels"][:, 1:].numel()  # only label positions were scored


def test_fast_cpu_loss_patch_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", kernel._use_triton)
    monkeypatch.setattr(trl_utils, "add_fused_lm_head", lambda model, **kwargs: None)  # a TRL that changed
    assert _trainer.enable_fast_cpu_loss() is False and not _trainer.fast_cpu_loss_active()


def test_full_finetune_sft_then_dpo(tmp_path: Path, tiny_model: Path) -> None:
    project = make_project(tmp_path / "person", tiny_model, "sft.method=full", "sft.max_steps=2", "dpo.max_steps=2")
    samples = make_samples()
    stats = train_sft(project, samples, GENERAL, tmp_path / "sft")
    assert stats["method"] == "full" and (tmp_path / "sft" / "model" / "config.json").is_file()
    negatives = [Negative(f"n{s.id}", s.id, "non_personified", f"As an assistant, turbines spin {s.id}.")
                 for s in samples]
    pairs, _ = build_pairs(project, samples, negatives)
    dstats = train_dpo(project, pairs_by_split(pairs, samples)["train"], tmp_path / "sft", tmp_path / "dpo")
    assert dstats["sanity"]["loss"] == pytest.approx(0.693147, abs=1e-4)  # explicit reference copy == policy
    assert (tmp_path / "dpo" / "model" / "config.json").is_file()


def test_qlora_needs_cuda_and_bitsandbytes() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        _model.check_method("qlora")


def test_dpo_reference_is_the_sft_model(sft_run: dict[str, Any], dpo_run: dict[str, Any], tiny_model: Path) -> None:
    from persllm.backends.hf import HFBackend

    end = template.TURN_MARKERS[0][1]
    reference = dpo_run["stats"]["sanity"]["ref_chosen_logps"]
    # step 0 scores the pairs in dataset order; TRL's completion is the answer and its end-of-turn marker
    pairs = dpo_run["split"]["train"][: len(reference)]
    requests = [(list(p.prompt), p.chosen + end) for p in pairs]
    sft = [s for s, _ in HFBackend(str(tiny_model), adapter=sft_run["dir"] / "adapter").score(requests)]
    base = [s for s, _ in HFBackend(str(tiny_model)).score(requests)]
    assert reference == pytest.approx(sft, abs=2e-3)
    assert reference != pytest.approx(base, abs=2e-3)


# -- turn-marker rows ------------------------------------------------------------------------------------------
def test_turn_marker_rows_are_trained_saved_and_merged(tmp_path: Path, tiny_model: Path) -> None:
    """Text mode adds no tokens, yet the template's marker rows train (a base model's <end_of_turn> row may be
    untrained), reach the saved adapter, and are the only embedding rows a merged adapter changes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.backends.hf import adapter_stack, merge_adapters

    project = make_project(tmp_path / "person", tiny_model)
    watch = ParamWatch()
    train_sft(project, make_samples(), GENERAL, tmp_path / "sft", callbacks=[watch])
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    vocab = tokenizer.get_vocab()
    markers = sorted(vocab[t] for t in template.markers_for(vocab))
    assert _model.trained_token_ids(tokenizer) == markers
    assert [n for n in watch.changed if "trainable_tokens_delta" in n] and all(watch.changed.values())
    adapter = tmp_path / "sft" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == markers
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    before = base.get_input_embeddings().weight.detach().clone()
    merged = merge_adapters(base, adapter_stack(adapter))
    after = merged.get_input_embeddings().weight.detach()
    changed = sorted(torch.nonzero((after - before).abs().sum(dim=1) > 0).flatten().tolist())
    assert changed == markers  # the marker rows moved, every other row is the base model's
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()


def test_cheap_trainable_tokens_match_peft_exactly(tiny_model: Path) -> None:
    """The patched trainable-token layers give PEFT's logits, loss and row gradients without full-matrix copies."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = [3, 4, 5, 300]
    results = []
    for cheap in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear",
                                                      trainable_token_indices=ids))
        delta = next(p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n)
        with torch.no_grad():
            delta.add_(torch.randn_like(delta))  # trained rows that differ from the base rows
        if cheap:
            assert _trainer.cheap_trainable_tokens(peft_model) == 2  # the embedding and the tied LM head
        x = torch.tensor([[2, 4, 10, 300, 11, 5, 5, 12, 3]])
        out = peft_model(input_ids=x, labels=x)
        out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(), delta.grad.detach().clone()))
    (logits_a, loss_a, grad_a), (logits_b, loss_b, grad_b) = results
    assert torch.allclose(logits_a, logits_b, atol=1e-5) and torch.allclose(loss_a, loss_b, atol=1e-6)
    assert torch.allclose(grad_a, grad_b, atol=1e-6) and grad_b.abs().sum() > 0


def test_smoke_budget_follows_the_reference_answers(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    assert _trainer.smoke_budget(tokenizer, ["[Response] short."]) == _trainer.SMOKE_NEW_TOKENS
    long = " ".join(["[Analysis] I answer from what I know at this time."] * 20)
    n = len(tokenizer(long, add_special_tokens=False)["input_ids"])
    assert _trainer.smoke_budget(tokenizer, ["short", long]) >= 1.5 * (n + 1) > _trainer.SMOKE_NEW_TOKENS


class GroupWatch(TrainerCallback):
    """Records, after each step, every optimizer group's learning rate and whether it holds token rows."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[float, bool]]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        rows = {id(p) for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
        self.steps.append([(g["lr"], any(id(p) in rows for p in g["params"])) for g in optimizer.param_groups])


def test_token_rows_learn_at_their_own_rate(tmp_path: Path, tiny_model: Path) -> None:
    """The marker rows get one optimizer group of their own at sft.token_lr_ratio times every other group's rate."""
    project = make_project(tmp_path / "person", tiny_model, "sft.token_lr_ratio=10")
    watch = GroupWatch()
    train_sft(project, make_samples(), GENERAL, tmp_path / "sft", callbacks=[watch])
    assert watch.steps
    for groups in watch.steps:
        rows = [lr for lr, has_rows in groups if has_rows]
        others = {lr for lr, has_rows in groups if not has_rows and lr > 0}
        assert len(rows) == 1 and others  # the rows left their group for one of their own
        assert all(rows[0] == pytest.approx(10 * lr) for lr in others)  # warmup and decay scale both alike
