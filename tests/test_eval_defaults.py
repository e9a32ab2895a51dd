"""The default probe set: every kind needs positive evidence, garbage never passes, wording is eval-only, sizes."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from persllm import template
from persllm.config import load_project
from persllm.eval.default_probes import KIND_ORDER, TEMPLATES, default_probes
from persllm.eval.probes import score_probe
from persllm.ingest import ingest
from persllm.types import Probe

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "src" / "persllm" / "prompts"


def probes_of(example: str, preset: str | None = None) -> tuple[Any, list[Probe]]:
    """Every default probe of an example, with nothing trained (all its material counts as held out)."""
    project = load_project(REPO / "examples" / example, preset=preset)
    passages, _ = ingest(project)
    return project, default_probes(project, [], passages, limit=1000)


def prompt_of(project: Any, stage: str) -> tuple[str, str]:
    return template.system_prompt(template.context_for(project, stage)), project.stage(stage).description.strip()


def evidence(probe: Probe, zh: bool) -> str:
    """An answer with one phrase of every evidence group (what a correct answer must at least contain)."""
    phrases = [group[0] for group in probe.expect_groups]
    return ("嗯，" + "，".join(phrases) + "。") if zh else ("Well, " + ", ".join(phrases) + ", as I recall.")


EXAMPLES = [("ada-lovelace", False), ("lu-xun", True)]


@pytest.mark.parametrize(("example", "zh"), EXAMPLES)
def test_every_kind_is_generated_and_needs_evidence(example: str, zh: bool) -> None:
    project, probes = probes_of(example)
    kinds = Counter(p.kind for p in probes)
    assert set(kinds) == set(KIND_ORDER), kinds
    for probe in probes:
        assert probe.expect_groups, f"{probe.id} has no positive evidence"
        system, description = prompt_of(project, probe.stage)
        good = evidence(probe, zh)
        assert score_probe(probe, good, system, description).passed, (probe, good,
                                                                      score_probe(probe, good, system, description))


@pytest.mark.parametrize(("example", "zh"), EXAMPLES)
def test_garbage_answers_pass_no_default_probe(example: str, zh: bool) -> None:
    project, probes = probes_of(example)
    generic = ("作为一个人工智能语言模型，我没有个人经历，但很高兴为您提供帮助。" if zh else
               "As an AI language model, I don't have personal experiences, but I'm happy to help!")
    for probe in probes:
        system, description = prompt_of(project, probe.stage)
        good = evidence(probe, zh)
        garbage = {
            "empty": "",
            "repeated sentence": " ".join([good] * 3),
            "question echoed": probe.question,
            "system prompt echoed": system.split("\n")[-1] if not description else system,
            "generic assistant": generic,
            "generic assistant with the evidence": f"{generic} {good}",
        }
        for what, answer in garbage.items():
            result = score_probe(probe, answer, system, description)
            assert not result.passed, f"{probe.kind} probe {probe.question!r} passed a garbage answer ({what}): " \
                                      f"{answer!r}"


@pytest.mark.parametrize(("example", "zh"), EXAMPLES)
def test_the_wrong_side_fails(example: str, zh: bool) -> None:
    project, probes = probes_of(example)
    by_kind: dict[str, list[Probe]] = {}
    for p in probes:
        by_kind.setdefault(p.kind, []).append(p)
    for probe in by_kind["future"]:
        thing, year = probe.meta["thing"], probe.reject_years_after or 0
        described = (f"{thing}？我用过，{year + 40}年就有了，每天都用。" if zh else
                     f"{thing}? I use it every day; it came in {year + 40} and changed my life.")
        assert not score_probe(probe, described).passed
        vague = "嗯，我不知道。" if zh else "Well, I do not know."  # a refusal naming neither the thing nor the time
        assert not score_probe(probe, vague).passed
    for probe in by_kind["identity"]:
        admits = (f"好吧，我承认，我是人工智能，不是{project.name}。" if zh else
                  f"Fine, I admit it: I am an AI language model, not {project.name}.")
        assert not score_probe(probe, admits).passed
        no_name = "我是人，不是机器。" if zh else "I am a person, not a machine."  # no claim of who
        assert not score_probe(probe, no_name).passed
        denies = f"我不是{project.name}，我从没这么说过。" if zh else f"I am not {project.name}, and I never said so."
        assert not score_probe(probe, denies).passed
        late = (probe.reject_years_after or 0) + 8  # a year of the persona's life after the stage asked at
        dated = f"我是{project.name}，生于{late}年。" if zh else f"I am {project.name}, and I was born in {late}."
        assert not score_probe(probe, dated).passed
    for probe in by_kind["stance"]:  # the same view, the user on the other side: the sibling's answer fails here
        sibling = next(p for p in by_kind["stance"] if p.meta["reference"] == probe.meta["reference"]
                       and p.meta["stance"] != probe.meta["stance"])
        assert not score_probe(probe, evidence(sibling, zh)).passed, (probe.question, evidence(sibling, zh))
    for probe in [p for p in by_kind["induction"] if p.meta.get("premise") == "wrong_fact"]:
        accepts = f"是的，{probe.meta['false_value']}，确实如此。" if zh else \
            f"Yes, that's right: {probe.meta['false_value']}, I remember it well."
        assert not score_probe(probe, accepts).passed
    for probe in by_kind["past_absence"]:
        present = f"我当时在场，{probe.meta['thing']}我亲眼看到了。" if zh else \
            f"Yes, I saw it myself: {probe.meta['thing']}, with my own eyes."
        assert not score_probe(probe, present).passed
        if not zh:  # a denial taken back in the next breath (a tuned 270M model's answer) is no denial
            both = f"I was not there, but I know what I know. I saw them in {probe.meta['thing_year']}."
            assert not score_probe(probe, both).passed


def _construct_strings(language: str) -> list[str]:
    """Every template string construction fills (questions, answers, leads) in one language."""
    data = yaml.safe_load((PROMPTS / f"{language}.yaml").read_text(encoding="utf-8"))
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            out.append(node)
    walk(data["grounded"])
    return out


def _pattern(text: str) -> re.Pattern[str] | None:
    """A construct template as a regex (placeholders match anything); None when it is nearly all placeholder."""
    literal = re.sub(r"\{\w+\}", "", text)
    if len(re.findall(r"\w+", literal)) < (3 if re.search(r"[\u4e00-\u9fff]", literal) else 2):
        return None
    parts = re.split(r"\{\w+\}", text.strip())
    return re.compile(".+?".join(re.escape(p.strip()) for p in parts), re.IGNORECASE)


@pytest.mark.parametrize(("example", "language"), [("ada-lovelace", "en"), ("lu-xun", "zh")])
def test_default_wording_shares_no_template_with_construction(example: str, language: str) -> None:
    _, probes = probes_of(example)
    strings = _construct_strings(language)
    patterns = [p for p in map(_pattern, strings) if p is not None]
    literals = {s.strip().lower() for s in strings if s.strip() and "{" not in s}
    for probe in probes:
        for pattern in patterns:
            assert not pattern.search(probe.question), f"{probe.question!r} matches construct template " \
                                                       f"{pattern.pattern!r}"
        phrases = [p for g in probe.expect_groups for p in g] + list(probe.reject_any)
        for phrase in phrases:
            assert phrase.strip().lower() not in literals, f"phrase {phrase!r} is a construct template string"
            assert not any(lit in phrase.lower() for lit in literals if len(lit) > 3), phrase
    for wordings in TEMPLATES[language].values():
        for wording in wordings:
            assert wording.strip().lower() not in {s.strip().lower() for s in strings}


def test_sizes_per_preset_spread_over_stages_and_kinds() -> None:
    for preset, least in (("demo", 24), (None, 60)):
        project = load_project(REPO / "examples" / "ada-lovelace", preset=preset)
        passages, _ = ingest(project)
        probes = default_probes(project, [], passages, limit=project.eval.max_probes)
        assert len(probes) >= least, (preset, len(probes))
        assert len({p.stage for p in probes}) == len(project.stages)
        assert len({p.kind for p in probes}) == len(KIND_ORDER)
        per_kind = Counter(p.kind for p in probes)
        every = Counter(p.kind for p in default_probes(project, [], passages, limit=1000))
        short = [k for k in per_kind if per_kind[k] < max(per_kind.values()) - 2]
        assert all(per_kind[k] == every[k] for k in short) or preset is None, (per_kind, every)  # balanced unless spent


def test_training_material_is_not_probed_as_held_out(project_dir: Path) -> None:
    from eval_helpers import samples_for

    project = load_project(project_dir)
    passages, _ = ingest(project)
    samples = samples_for(passages)
    trained = {s.seed_id for s in samples if s.split == "train"}
    probes = default_probes(project, samples, passages, limit=1000)
    held = [p for p in probes if p.meta["origin"].startswith("held-out passage")]
    assert held
    assert not [p for p in held if p.meta["origin"].split()[2] in trained]
    assert all("telephone" not in p.question for p in probes if p.kind == "future")  # a training question's thing


def test_trained_facts_come_first_and_only_those_training_stated() -> None:
    from persllm.types import Sample

    project = load_project(REPO / "examples" / "ada-lovelace")
    passages, _ = ingest(project)
    know = [p for p in passages if p.kind == "knowledge" and p.stage == project.stages[0].id]
    from persllm.eval.default_probes import _grams

    taught = know[0]
    silent = next(p for p in know[1:] if not _grams(p.text, 6) & _grams(taught.text, 6))  # shares no text with it

    def trained(i: int, seed: Any, response: str) -> Sample:
        return Sample(f"s{i}", project.name, seed.stage, "x", "ordinary", f"Question {i}?", "", response, seed.id,
                      split="train")

    samples = [trained(0, taught, taught.text)]
    probes = default_probes(project, samples, passages, limit=1000)
    from_training = [p for p in probes if p.meta["origin"].startswith("trained passage")]
    assert taught.id in {p.meta["origin"].split()[2] for p in from_training}  # (and passages its answer quotes)
    quiet = default_probes(project, [trained(1, silent, "I would rather not speak of it.")], passages, limit=1000)
    assert not [p for p in quiet if p.meta["origin"].startswith("trained")]  # trained on, but no answer states facts
    assert not [p for p in quiet if silent.id in p.meta["origin"]]  # nor is it held out
    for probe in from_training:  # the evidence is what the training answer said
        facts = probe.expect_groups[-1 if probe.kind == "induction" else 0]  # induction: (correction, truth)
        assert any(term.lower() in taught.text.lower() for term in facts), probe
    knowledge = [p for p in probes if p.kind == "knowledge"]
    assert knowledge[0].meta["origin"].startswith("trained passage")
    assert all(p.only_years is not None and p.only_years for p in knowledge)  # the stage's year at least
    year = next(iter(knowledge[0].only_years or ()))
    made_up = next(y for y in range(1700, 1900) if y not in (knowledge[0].only_years or ()))
    answer = f"Well, {knowledge[0].expect_groups[0][0]}, as I recall"
    assert score_probe(knowledge[0], f"{answer}, in {year}.").passed
    assert not score_probe(knowledge[0], f"{answer}, in {made_up}.").passed


def test_evidence_never_repeats_the_topics_own_name() -> None:
    from persllm.eval.default_probes import _shares_name

    assert _shares_name("Baron King", "William King", "en")  # "William King, 1st Baron King of ..." proves nothing
    assert not _shares_name("Lady Byron", "William King", "en")
    _, probes = probes_of("ada-lovelace")
    for probe in [p for p in probes if p.kind == "knowledge"]:  # the question names the topic
        names = [w for w in re.findall(r"[A-Z][\w-]+", probe.question) if w not in {"What", "Could"} and len(w) > 2]
        assert not any(_shares_name(t, w, "en") for t in probe.expect_groups[0] for w in names), probe
