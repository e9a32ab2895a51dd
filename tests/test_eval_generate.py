"""One-pass generation and option log-likelihoods on the tiny model, and the rag baseline's retrieval."""

from __future__ import annotations

from pathlib import Path

import pytest

from persllm.backends.base import GenParams

SHORT = ["<bos>system\nYou are Ada. Who", "<bos>system\nYou are Ada. Tell me about the engine and poetry",
         "<bos>system\nYou are Ada. Hi"]  # shorter than the tiny model's 64-token sliding window: prefix is shared


@pytest.fixture(scope="module")
def backend(tiny_model: Path):  # type: ignore[no-untyped-def]
    from persllm.backends.hf import HFBackend

    return HFBackend(tiny_model)


def test_greedy_rows_match_transformers_generate(backend) -> None:  # type: ignore[no-untyped-def]
    from persllm.types import Message

    long = [[Message("system", "You are Test Person. It is 1900. Stay in character and answer briefly, please."),
             Message("user", q)] for q in ("What did you build?", "Where do you live?")]
    for requests in (SHORT, long):  # with a shared prefix, and with plain left padding beyond the window
        rows = backend.generate_rows(requests, [0.0] * len(requests), 10)
        reference = [backend.complete(r, GenParams(temperature=0.0, max_tokens=10)) for r in requests]
        assert [r.text for r in rows] == [r.text for r in reference]


def test_sampled_rows_are_seeded_and_vary(backend) -> None:  # type: ignore[no-untyped-def]
    requests = SHORT[:1] * 4
    first = backend.generate_rows(requests, [1.0] * 4, 12, seed=3)
    again = backend.generate_rows(requests, [1.0] * 4, 12, seed=3)
    other = backend.generate_rows(requests, [1.0] * 4, 12, seed=4)
    assert [c.text for c in first] == [c.text for c in again]
    assert len({c.text for c in first}) > 1 and [c.text for c in first] != [c.text for c in other]


def test_option_logprobs_match_one_prompt_at_a_time(backend) -> None:  # type: ignore[no-untyped-def]
    import torch

    options = ["1", "2", "3", "4", "5"]
    batched = backend.option_logprobs(SHORT, options, prefix=" [Response] ")
    for text, got in zip(SHORT, batched):
        # Reference: log-likelihood of all tokens after the prompt tokens every option shares (with byte-level BPE
        # " 1" is one token but " 2" is "Ġ" + "2"), one unbatched forward per option.
        fulls = [backend.tokenizer(text + " [Response] " + o, add_special_tokens=False)["input_ids"] for o in options]
        shared = next(i for i in range(min(map(len, fulls))) if len({f[i] for f in fulls}) > 1)
        expected = []
        for full in fulls:
            with torch.inference_mode():
                logp = torch.log_softmax(backend.model(input_ids=torch.tensor([full])).logits[0].float(), -1)
            expected.append(sum(float(logp[i - 1, full[i]]) for i in range(shared, len(full))))
        assert got == pytest.approx(expected, abs=1e-4)
        assert any(len(f) - shared == 2 for f in fulls)  # the two-token path is exercised


def test_rag_block_never_contains_held_out_passages(project_dir: Path) -> None:
    from persllm.config import load_project
    from persllm.eval.generate import RagIndex, persona_messages
    from persllm.ingest import ingest

    project = load_project(project_dir)
    passages, _ = ingest(project)
    held = next(p for p in passages if "steam turbine" in p.text)
    rag = RagIndex(passages, {held.id}, budget=400, language="en")
    messages = persona_messages(project, "early", "Tell me about the steam turbine you built.", rag)
    assert "What you know" in messages[0].content and held.text not in messages[0].content
    plain = persona_messages(project, "early", "Tell me about the steam turbine you built.")
    assert messages[0].content.startswith(plain[0].content) and messages[1:] == plain[1:]


def test_tuned_peer_adapters_answer_without_retrieval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer's SFT/DPO adapter plays the peer with its training prompt: the rag baseline's material stays out."""
    import persllm.backends.hf
    import persllm.variants
    from conftest import MINIMAL_YAML, write_project
    from persllm.config import ModelSpec, load_project
    from persllm.eval import runner
    from persllm.eval.generate import Decoding, ModelUnderTest
    from persllm.progress import NULL
    from persllm.types import Sample

    class Retrieval:  # what load_peers attaches to a peer that has ingest output
        def block(self, stage: str, question: str) -> str:
            return "RETRIEVED MATERIAL"

    class Loaded:
        parameters = None  # the Backend attribute peers' decoding is chosen from

        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def close(self) -> None:
            pass

    project = load_project(write_project(tmp_path / "me"))
    peer_project = load_project(write_project(tmp_path / "peer", MINIMAL_YAML.replace("Test Person", "Other Person")))
    seen: dict[str, list] = {"asks": [], "personas": []}
    monkeypatch.setattr(persllm.variants, "spec_for", lambda p, v: ModelSpec(backend="hf", model="m", adapter="a"))
    monkeypatch.setattr(persllm.backends.hf, "HFBackend", Loaded)
    monkeypatch.setattr(runner, "answer_all", lambda model, backend, asks, *a: seen["asks"].extend(asks) or [])
    monkeypatch.setattr(runner, "administer", lambda persona, *a: seen["personas"].append(persona) or {})
    question = Sample("q1", "test-person", "early", "1900", "ordinary", "What did you build?", "a", "r", "p1",
                      split="test")
    plan = runner.Plan(probes=[], heldout=[question], words=[], ipip_stages=[], interview=[],
                       decoding=Decoding(8, 0.7, 0))
    model = ModelUnderTest("sft", "sft", "sft", local=True)
    peer = runner.Persona(peer_project.slug, peer_project, Retrieval())  # type: ignore[arg-type]
    run = runner.ModelRun(model)
    runner._tuned_peers(project, model, plan, [peer], run, [], NULL)
    assert seen["asks"] and all("RETRIEVED" not in m.content for ask in seen["asks"] for m in ask.messages)
    assert seen["personas"] and all(p.rag is None for p in seen["personas"])


def test_few_shot_baseline_only_for_base_models_without_a_chat_template_of_their_own(project_dir: Path) -> None:
    from types import SimpleNamespace

    from eval_helpers import samples_for
    from persllm.config import load_project
    from persllm.eval.generate import FewShot, ModelUnderTest, cut_few_shot, few_shot_examples, few_shot_prompt
    from persllm.eval.runner import few_shot_for
    from persllm.ingest import ingest

    project = load_project(project_dir)
    passages, _ = ingest(project)
    samples = samples_for(passages)
    shots = FewShot({s.id: few_shot_examples(samples, s.id) for s in project.stages}, "she")
    plan = SimpleNamespace(few_shot=shots)
    base = ModelUnderTest("base", "base", "base", local=True)
    rag = ModelUnderTest("rag", "base", "base", local=True, rag=True)
    sft = ModelUnderTest("sft", "sft", "sft", local=True)
    plain, chat = SimpleNamespace(own_chat_template=False), SimpleNamespace(own_chat_template=True)
    assert few_shot_for(project, base, plain, plan) is shots and few_shot_for(project, rag, plain, plan) is shots
    assert few_shot_for(project, base, chat, plan) is None  # an instruction-tuned base keeps its own template
    assert few_shot_for(project, sft, plain, plan) is None  # tuned models answer in their training format
    forced = load_project(project_dir, overrides=["eval.base_prompting=few_shot"])
    assert few_shot_for(forced, base, chat, plan) is shots
    never = load_project(project_dir, overrides=["eval.base_prompting=chat"])
    assert few_shot_for(never, base, plain, plan) is None

    prompt = few_shot_prompt(project, "early", "Where did you study?", shots)
    used = shots.examples["early"]
    assert used and all(s.split == "train" and s.stage == "early" for s in used)
    test_questions = [s.question for s in samples if s.split == "test"]
    assert not any(q in prompt for q in test_questions)  # examples come from the training split only
    assert prompt.endswith("Question: Where did you study?\nTest Person:")
    assert "in her own words" in prompt and "A young engineer in Vienna." in prompt
    assert cut_few_shot(" I studied in Vienna.\n\nQuestion: And then?\nTest Person: x", "en") == (
        "I studied in Vienna.", True)
    assert cut_few_shot(" I studied", "en") == ("I studied", False)
    assert cut_few_shot(" Yes, I saw it.\nTest Person: Yes, I saw it.", "en") == ("Yes, I saw it.", True)
    assert cut_few_shot("我没见过。\n鲁迅：我没见过。", "zh") == ("我没见过。", True)


def test_has_own_chat_template_tells_persllms_from_a_models_own() -> None:
    from types import SimpleNamespace

    from persllm import template
    from persllm.backends.hf import has_own_chat_template

    assert not has_own_chat_template(SimpleNamespace(chat_template=None))
    assert not has_own_chat_template(SimpleNamespace(chat_template=template.chat_template(training=True)))
    assert not has_own_chat_template(SimpleNamespace(chat_template=template.chat_template(
        "<|im_start|>", "<|im_end|>", training=False)))
    assert has_own_chat_template(SimpleNamespace(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}"))
