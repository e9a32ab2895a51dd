"""Pure-Python parts of training: SFT record mixing, DPO pair building, preference summaries, step-0 verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from persllm.config import load_project
from persllm.errors import DataError, PersllmError
from persllm.progress import NULL
from persllm.template import RESPONSE_TAG, time_token
from persllm.train._trainer import newest_checkpoint, plot_curves, prepare_checkpoints, write_metrics
from persllm.train.data import build_sft_records, sample_prompt
from persllm.train.dpo import sanity_verdict
from persllm.train.pairs import build_pairs, pairs_by_split
from persllm.train.prefs import summarize
from persllm.types import Message, Negative, PreferencePair, Sample


def make_sample(i: int, stage: str = "early", split: str = "train", kind: str = "ordinary",
                persona: str = "test-person", question: str | None = None, response: str | None = None) -> Sample:
    return Sample(id=f"{persona}-{i}", persona=persona, stage=stage, time_label="1900" if stage == "early" else "1930",
                  kind=kind, question=question or f"What did you build in the workshop in {1890 + i}?",
                  analysis=f"The question is about my work in {1890 + i}.",
                  response=response or f"I built a small steam turbine, number {i}, with Otto.", seed_id="p1",
                  split=split)  # type: ignore[arg-type]


@pytest.fixture
def project(project_dir: Path):
    return load_project(project_dir, overrides=["sft.repeat=3", "sft.general_ratio=0.5", "dpo.pairs_per_sample=2"])


# -- SFT records -----------------------------------------------------------------------------------------------
def test_records_repeat_mix_and_shuffle_deterministically(project) -> None:
    samples = [make_sample(i, split="train") for i in range(4)] + [make_sample(9, split="test")]
    general = [[Message("user", f"general question {i}"), Message("assistant", f"general answer {i}")]
               for i in range(10)]
    records, counts = build_sft_records(project, samples, general)
    assert counts["personified"] == 12 and counts["personified_samples"] == 4  # test split excluded, x3 repeat
    assert counts["general"] == 6  # 0.5 x 12, sampled without replacement from 10
    general_texts = [r["messages"][-1]["content"] for r in records if r["messages"][0]["role"] == "user"]
    assert len(general_texts) == 6 and len(set(general_texts)) == 6
    again, _ = build_sft_records(project, samples, general)
    assert again == records
    persona = [r for r in records if r["messages"][0]["role"] == "system"]
    expected = [{"role": m.role, "content": m.content} for m in sample_prompt(project, samples[0])]
    assert any(r["messages"][:2] == expected for r in persona)
    assert all(r["messages"][-1]["content"].startswith("[Analysis]") for r in persona)
    assert records != [r for r in records if r["messages"][0]["role"] == "system"] + [
        r for r in records if r["messages"][0]["role"] != "system"]  # shuffled, not blocks


def test_general_is_repeated_only_when_needed(project) -> None:
    samples = [make_sample(i) for i in range(4)]
    general = [[Message("user", "q1"), Message("assistant", "a1")],
               [Message("user", "q2"), Message("assistant", "a2")],
               [Message("user", "no answer")]]  # dropped: nothing to learn
    records, counts = build_sft_records(project, samples, general)
    assert counts["general_available"] == 2 and counts["general"] == 6
    texts = sorted(r["messages"][-1]["content"] for r in records if r["messages"][0]["role"] == "user")
    assert texts == ["a1"] * 3 + ["a2"] * 3


def test_prompt_uses_time_token_in_token_mode(project_dir: Path) -> None:
    project = load_project(project_dir, overrides=["sft.temporal_labels=tokens"])
    prompt = sample_prompt(project, make_sample(1, stage="late"))
    assert prompt[-1].content.startswith(time_token(1) + " ")
    assert "1930" not in prompt[0].content  # the stage is marked by the token, not in text
    with pytest.raises(DataError, match="not a stage"):
        sample_prompt(project, make_sample(1, stage="middle"))


# -- DPO pairs ---------------------------------------------------------------------------------------------------
def test_build_pairs_types_limits_and_drops(project) -> None:
    s0, s1 = make_sample(0), make_sample(1, split="test")
    negatives = [
        Negative("n1", s0.id, "other_stage", "I run a motor factory in Berlin with four hundred workers."),
        Negative("n2", s0.id, "non_personified", "As an AI language model, I can tell you turbines are machines."),
        Negative("n3", s0.id, "induced", "Yes, I met the emperor and he admired my turbine very much."),
        Negative("n4", s0.id, "other_stage", s0.response.upper() + "!"),  # same text up to case: dropped
        Negative("n5", s0.id, "other_stage", "   "),  # empty: dropped
        Negative("n6", "missing", "other_stage", "whatever"),
        Negative("n7", s1.id, "non_personified", "Turbines convert the energy of steam into rotation."),
    ]
    project.dpo.negative_types = ["other_stage", "non_personified"]  # induced disabled
    pairs, stats = build_pairs(project, [s0, s1], negatives)
    by_sample = {p.sample_id: p for p in pairs}
    assert sorted(p.negative_type for p in pairs if p.sample_id == s0.id) == ["non_personified", "other_stage"]
    assert stats["dropped"] == {"empty": 1, "near_identical": 1, "type_not_enabled": 1, "unknown_sample": 1}
    assert stats["by_split"] == {"test": 1, "train": 2}
    pair = by_sample[s1.id]
    assert list(pair.prompt) == sample_prompt(project, s1)
    assert pair.chosen.endswith(s1.response) and RESPONSE_TAG in pair.rejected
    assert s1.analysis in pair.rejected  # a negative without analysis reuses the chosen one
    assert 0 <= pair.similarity < project.dpo.max_similarity
    split = pairs_by_split(pairs, [s0, s1])
    assert [p.sample_id for p in split["test"]] == [s1.id] and len(split["train"]) == 2

    project.dpo.pairs_per_sample = 1
    pairs, stats = build_pairs(project, [s0], negatives[:3])
    assert len(pairs) == 1 and stats["dropped"]["over_limit"] == 1
    ids = {p.id for p in build_pairs(project, [s0], negatives[:3])[0]}
    assert ids == {p.id for p in pairs}  # stable ids


def test_pair_types_cover_all_contrasts_and_held_out_pairs_are_uncapped(project) -> None:
    project.dpo.negative_types = ["other_stage", "non_personified", "induced"]
    project.dpo.pairs_per_sample = 1
    samples = [make_sample(i) for i in range(12)]
    induced = make_sample(20)
    induced = type(induced)(**{**{f: getattr(induced, f) for f in induced.__dataclass_fields__}, "kind": "induced"})
    held_out = make_sample(30, split="test")
    negatives = [Negative(f"o{i}", s.id, "other_stage", f"I lived in Berlin then, year {i}.") for i, s in
                 enumerate([*samples, induced, held_out])]
    negatives += [Negative(f"g{i}", s.id, "non_personified", f"As an assistant I can say fact number {i}.") for i, s in
                  enumerate([*samples, induced, held_out])]
    negatives += [Negative("acc", induced.id, "induced", "Yes, of course, I met the emperor in Lisbon."),
                  Negative("acc2", held_out.id, "induced", "Yes, exactly as you say, it was in Rome.")]
    pairs, _ = build_pairs(project, [*samples, induced, held_out], negatives)
    train_types = {p.negative_type for p in pairs if p.sample_id in {s.id for s in samples}}
    assert train_types == {"other_stage", "non_personified"}  # a cap of 1 still covers both contrasts
    assert [p.negative_type for p in pairs if p.sample_id == induced.id] == ["induced"]  # the anti-induction pair
    assert sorted(p.negative_type for p in pairs if p.sample_id == held_out.id) == [
        "induced", "non_personified", "other_stage"]  # held-out pairs are for measuring: all of them


def test_other_persona_negatives_come_from_the_most_similar_peer_question(project) -> None:
    own = [make_sample(0, question="What did you build with Otto near the Danube canal?"),
           make_sample(1, question="How do you feel about the prize you received?")]
    peers = [make_sample(10, persona="other", question="Tell me about the weather in London.",
                         response="It rains every day in London."),
             make_sample(11, persona="other", question="What did you build near the canal with your friend?",
                         response="We built a wooden boat and sailed it on the canal."),
             make_sample(12, persona="test-person", question="What did you build with Otto near the canal?",
                         response="Own persona: never a negative.")]
    project.dpo.negative_types = ["other_persona"]
    pairs, stats = build_pairs(project, own, [], peer_samples=peers)
    assert [(p.sample_id, p.negative_type) for p in pairs] == [(own[0].id, "other_persona")]
    assert pairs[0].rejected.endswith("We built a wooden boat and sailed it on the canal.")
    assert stats["dropped"]["no_peer_match"] == 1  # nothing similar to the prize question
    assert stats["by_type"] == {"other_persona": 1}


# -- preference accuracy and the step-0 verdict -----------------------------------------------------------------
def test_summarize_counts_normalised_and_summed_wins() -> None:
    pairs = [PreferencePair(f"p{i}", "s", t, (Message("user", "q"),), "c", "r")
             for i, t in enumerate(["other_stage", "induced"])]
    # pair 0: chosen better per token but worse in sum (longer); pair 1: chosen worse both ways
    scores = [(-10.0, 10), (-6.0, 3), (-9.0, 3), (-3.0, 3)]
    result = summarize(pairs, scores)
    assert result["accuracy"] == 0.5 and result["accuracy_sum"] == 0.0
    assert result["by_type"] == {"induced": {"pairs": 1, "accuracy": 0.0}, "other_stage": {"pairs": 1, "accuracy": 1.0}}


def test_sanity_verdict_alarms() -> None:
    ok = sanity_verdict([False, False], [-5.0, -6.0], [-7.0, -7.0], [-5.0, -6.0], [-7.0, -7.0], beta=0.1)
    assert ok["loss"] == pytest.approx(0.693147, abs=1e-5) and ok["accuracy"] == 0.0
    with pytest.raises(PersllmError, match="identical"):
        sanity_verdict([True, True], [-5.0, -6.0], [-5.0, -6.0], [-5.0, -6.0], [-5.0, -6.0], beta=0.1)
    with pytest.raises(PersllmError, match="already .* with reward accuracy 1.0"):
        # policy (a continued SFT adapter) prefers chosen by far more than the reference does
        sanity_verdict([False, False], [-5.0, -4.0], [-120.0, -130.0], [-50.0, -50.0], [-50.0, -50.0], beta=0.1)


def test_prepare_checkpoints_resumes_only_the_same_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    assert prepare_checkpoints(ckpt, "a", True, NULL) is None
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6 was cut off while saving
        (ckpt / f"checkpoint-{step}").mkdir()
        if complete:
            (ckpt / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert newest_checkpoint(ckpt) == ckpt / "checkpoint-4"
    assert prepare_checkpoints(ckpt, "a", True, NULL) == str(ckpt / "checkpoint-4")
    assert prepare_checkpoints(ckpt, "b", True, NULL) is None  # other inputs: discarded
    assert not (ckpt / "checkpoint-4").exists()


def test_metrics_keep_logged_steps_only(tmp_path: Path) -> None:
    history = [{"loss": 2.0, "learning_rate": 1e-4, "grad_norm": 1.5, "step": 1, "note": "x"},
               {"loss": 0.6, "rewards/margins": 0.3, "rewards/accuracies": 1.0, "step": 2},
               {"train_runtime": 3.0, "train_loss": 1.3, "step": 2}]  # the run summary is not a step
    rows = write_metrics(tmp_path, history)
    assert rows == [{"step": 1, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": 1.5},
                    {"step": 2, "loss": 0.6, "rewards/margins": 0.3, "rewards/accuracies": 1.0}]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_curves(tmp_path / "empty.png", []) and not (tmp_path / "empty.png").exists()


def test_curves_png(tmp_path: Path) -> None:
    rows = [{"step": i, "loss": 1 / i, "rewards/margins": 0.1 * i} for i in range(1, 6)]
    assert plot_curves(tmp_path / "curves.png", rows)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
