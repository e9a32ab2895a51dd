"""Units of data handling: text budgets, ingest provenance, dedup, planning and the split."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

from conftest import write_project
from persllm import text as T
from persllm.config import load_project
from persllm.construct import facts as F
from persllm.construct.dedup import distinct_questions, near_duplicates
from persllm.construct.plan import Slot, choose_seeds, make_plan, split_seeds, weighted_sequence
from persllm.construct.records import Question
from persllm.ingest import ingest
from persllm.types import Passage


def test_token_counts_work_for_chinese_and_english() -> None:
    assert T.count_tokens("Ada met Babbage in 1833.") == 6
    assert T.count_tokens("我在一八三三年见到了巴贝奇。") == 14  # one token per character, not one per "word"
    assert T.sentences("我来了。你呢？好的！") == ["我来了。", "你呢？", "好的！"]


def test_split_long_keeps_overlap_and_budget() -> None:
    sentences = [f"Sentence number {i} is about the engine and the loom." for i in range(30)]
    pieces = T.split_long(" ".join(sentences), max_tokens=60, overlap=15)
    assert len(pieces) > 3
    assert all(T.count_tokens(p) <= 60 for p in pieces)
    for a, b in itertools.pairwise(pieces):
        assert T.sentences(a)[-1] in b  # consecutive pieces share at least the last sentence
    chinese = "。".join(["这是关于分析机的一句很长的话" for _ in range(40)]) + "。"
    zh = T.split_long(chinese, max_tokens=50, overlap=10)
    assert len(zh) > 4 and all(T.count_tokens(p) <= 50 for p in zh)


def test_ingest_provenance_tags_and_splitting(tmp_path: Path) -> None:
    long_line = " ".join(f"In {1880 + i} she built machine number {i} in the workshop." for i in range(40))
    root = write_project(tmp_path / "p", knowledge={
        "early": ["【Childhood】Test Person was born in 1878 in Graz.", "Notes.", long_line],
        "late": ["In 1921 she founded a company in Berlin that made motors."]})
    project = load_project(root)
    passages, stats = ingest(project)
    early_k = [p for p in passages if p.stage == "early" and p.kind == "knowledge"]
    assert early_k[0].text == "Test Person was born in 1878 in Graz." and early_k[0].line == 1
    assert early_k[0].source == "early_knowledge.txt"
    parts = [p for p in early_k if p.line == 3]
    assert len(parts) > 1 and [p.part for p in parts] == list(range(len(parts)))
    assert stats["skipped_lines"] == {"too_short": 1}
    again, _ = ingest(project)
    assert [p.id for p in again] == [p.id for p in passages]  # stable ids


def test_near_duplicates_cluster_and_keep_first() -> None:
    texts = ["What do you remember about Charles Babbage?", "Tell me about the loom.",
             "What do you remember about Charles Babbage!", "what do you remember about charles babbage",
             "Why did you marry William King in 1835?", "Tell me about the loom"]
    keep, dropped = near_duplicates(texts, threshold=0.7)
    assert keep == [0, 1, 4]
    assert dropped == {2: 0, 3: 0, 5: 1}
    assert near_duplicates([], 0.7) == ([], {})


def test_distinct_questions_compare_within_a_stage_and_rules_by_their_text() -> None:
    seed = Passage(id="p", persona="Ada", stage="early", kind="knowledge", text="x", source="s", line=1)

    def ask(stage: str, text: str, origin: str) -> tuple[Slot, Question]:
        return Slot(f"{stage}-{text}", stage, seed, "ordinary", "", "train"), Question(text, origin)

    asked = [ask("early", "What happened to you in 1835?", "template"),
             ask("early", "What happened to you in 1843?", "template"),  # another year: another question
             ask("early", "What happened to you in 1835?", "template"),  # the same question again
             ask("late", "What happened to you in 1835?", "template"),  # at another stage: another answer
             ask("early", "What happened to you in 1835 ?", "teacher"),  # a model's near-copy
             ask("late", "Why did you study the loom?", "teacher")]
    keep, dropped = distinct_questions(asked, threshold=0.7)
    assert keep == [0, 1, 3, 5] and dropped == {2: 0, 4: 0}


def test_weighted_sequence_is_proportional_and_interleaved() -> None:
    seq = weighted_sequence({"ordinary": 0.4, "opinion": 0.3, "induced": 0.3}, 30)
    assert Counter(seq) == {"ordinary": 12, "opinion": 9, "induced": 9}
    assert all(seq[i:i + 3].count("ordinary") < 3 for i in range(28))


def _passages(n: int, kind: str) -> list[Passage]:
    return [Passage(f"s-{kind[0]}-{i}", "p", "s", kind, f"text {i}", "f.txt", i + 1) for i in range(n)]  # type: ignore[arg-type]


def test_split_is_per_seed_stratified_and_seeded() -> None:
    seeds = _passages(10, "knowledge") + _passages(5, "style")
    split = split_seeds(seeds, 0.2, seed=1)
    assert Counter(split[p.id] for p in seeds if p.kind == "knowledge") == {"train": 8, "test": 2}
    assert Counter(split[p.id] for p in seeds if p.kind == "style") == {"train": 4, "test": 1}
    assert split == split_seeds(seeds, 0.2, seed=1) and split != split_seeds(seeds, 0.2, seed=2)
    limited = choose_seeds(seeds, 6, seed=1)
    assert len(limited) == 6 and {p.kind for p in limited} == {"knowledge", "style"}


def test_plan_slots_have_stable_ids_and_no_shared_seed(project_dir: Path) -> None:
    project = load_project(project_dir)
    passages, _ = ingest(project)
    slots = make_plan(project, passages)
    assert len({s.id for s in slots}) == len(slots) == len(passages) * 3
    by_seed: dict[str, set[str]] = {}
    for slot in slots:
        by_seed.setdefault(slot.seed.id, set()).add(slot.split)
    assert all(len(splits) == 1 for splits in by_seed.values())
    assert [s.id for s in make_plan(project, passages)] == [s.id for s in slots]


def test_person_conversion_and_false_premises() -> None:
    ref = F.persona_ref("Marie Curie", "en", ["She worked. Her lab."], ["Maria Skłodowska"])
    assert F.convert_person("Maria Skłodowska was born in Warsaw and her father taught physics.", ref) \
        == "I was born in Warsaw and my father taught physics."
    assert F.convert_person("In 1898 Marie and Pierre Curie announced polonium.", ref) \
        == "In 1898 Pierre Curie and I announced polonium."
    assert F.convert_person("Pierre Curie admired her.", ref, "second") == "Pierre Curie admired you."
    assert not F.mentions_persona("I was born in Warsaw.", ref) and F.mentions_persona("She was born.", ref)
    import random

    premise = F.perturb("In 1903 she won the Nobel Prize.", ref, [], random.Random(0))
    assert premise is not None and premise.truth == "1903" and premise.false_value != "1903"
    assert premise.false_value in premise.false_sentence
    zh = F.persona_ref("居里夫人", "zh", ["她在巴黎工作。"])
    assert F.convert_person("居里夫人1891年来到巴黎，她和她们一起学习。", zh) == "我1891年来到巴黎，我和她们一起学习。"


def test_entity_kinds_and_like_for_like_false_premises() -> None:
    """A false premise swaps a person for a person and a place for a place ("the poet Royal Hospital" was one)."""
    import random

    material = ("She was the only child of the poet George Gordon, Lord Byron. Mary Somerville, the Scottish "
                "mathematician, became her friend. She wrote letters to Mary Somerville. Augustus De Morgan was "
                "married to Sophia De Morgan. They visited Babbage's house in Dorset Street. Later she lived at "
                "Ockham Park and at Royal Hospital. The Analytical Engine was never built.")
    kinds = {e: F.entity_kind(e, material) for e in ("George Gordon", "Mary Somerville", "Augustus De Morgan",
                                                      "Sophia De Morgan", "Dorset Street", "Ockham Park",
                                                      "Royal Hospital", "Analytical Engine", "Lady Byron")}
    assert kinds == {"George Gordon": "person", "Mary Somerville": "person", "Augustus De Morgan": "person",
                     "Sophia De Morgan": "person", "Dorset Street": "place", "Ockham Park": "place",
                     "Royal Hospital": "place", "Analytical Engine": "other", "Lady Byron": "person"}
    ref = F.persona_ref("Ada Lovelace", "en", [material])
    sentence = "She was the only child of the poet George Gordon, Lord Byron."
    others = ["Royal Hospital", "Dorset Street", "Analytical Engine", "Mary Somerville"]
    for seed in range(20):
        premise = F.perturb(sentence, ref, others, random.Random(seed), material)
        assert premise is not None and premise.false_value == "Mary Somerville"
    assert F.perturb(sentence, ref, ["Royal Hospital", "Dorset Street"], random.Random(0), material) is None
    moved = F.perturb("In June she visited Dorset Street.", ref, ["Mary Somerville", "Ockham Park"],
                      random.Random(0), material)
    assert moved is not None and moved.false_value == "Ockham Park"


def _placeholders(node: object, path: str = "") -> dict[str, set[str]]:
    """Dotted key -> the {placeholders} its text uses (lists contribute their items' placeholders)."""
    import string

    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _placeholders(child, f"{path}.{key}").items()}
    if isinstance(node, list):
        return {path: set().union(*(_placeholders(item, path).get(path, set()) for item in node))}
    names = {f for _, f, _, _ in string.Formatter().parse(str(node)) if f} if isinstance(node, str) else set()
    return {path: names}


def test_a_sentence_joined_to_a_lead_keeps_its_names_capitalised() -> None:
    material = "Ada met Charles Babbage. Woronzow Greig proposed his friend. She wrote to Babbage."
    assert F.lower_start("The engine was built.", material) == "the engine was built."
    assert F.lower_start("Babbage asked me.", material) == "Babbage asked me."  # capitalised inside a sentence
    assert F.lower_start("Woronzow Greig proposed his friend.", material) == "Woronzow Greig proposed his friend."
    assert F.lower_start("Soon I wrote.", material) == "soon I wrote."  # "I" is no name after it
    assert F.lower_start("I wrote.", material) == "I wrote."


def test_prompt_files_have_the_same_keys_and_placeholders_in_every_language() -> None:
    from persllm.prompts import LANGUAGES, load_prompts

    en = _placeholders({k: v for k, v in load_prompts("en").data.items() if k != "version"})
    for language in LANGUAGES[1:]:
        other = _placeholders({k: v for k, v in load_prompts(language).data.items() if k != "version"})
        assert set(other) == set(en), f"{language}: keys differ: {sorted(set(other) ^ set(en))}"
        # a list holds alternatives (a translation may use fewer of its fields); a single text must match exactly
        lists = {k for k in en if isinstance(load_prompts("en").get(k.lstrip(".")), list)}
        differing = {k for k in en if not ({p.lower() for p in other[k]} <= {p.lower() for p in en[k]}
                                           if k in lists else {p.lower() for p in en[k]} == {p.lower() for p in other[k]})}
        assert not differing, f"{language}: placeholders differ in {sorted(differing)}"


def test_atomic_dir_replaces_only_on_success(tmp_path: Path) -> None:
    import pytest

    from persllm.workspace import atomic_dir

    target = tmp_path / "out" / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
        assert not target.exists()  # nothing is visible until the block succeeds
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half-written")
        raise RuntimeError("killed while saving")
    assert (target / "weights").read_text() == "v1"  # the old result survives a failed save
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]  # and no temp folder is left
