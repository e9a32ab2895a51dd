"""`persllm converse`: perspective prompts, no agent speaking for another, next-speaker policies, stance, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES
from persllm import converse as talk
from persllm.backends.fake import FakeBackend
from persllm.cli.use import parse_target
from persllm.config import Project, load_project
from persllm.types import Message

TOPIC = "Should machines ever be said to think?"


@pytest.fixture(scope="module")
def people() -> tuple[Project, Project]:
    return load_project(EXAMPLES / "ada-lovelace"), load_project(EXAMPLES / "marie-curie")


def agents(people: tuple[Project, Project], *backends: FakeBackend) -> list[talk.Agent]:
    ada, marie = people
    members = [(ada, "mature", "base"), (marie, "laureate", "base")]
    made = talk.open_agents(members, lambda p, v: FakeBackend())
    return [talk.Agent(a.name, a.project, a.stage, a.variant, b, a.tags) for a, b in zip(made, backends, strict=True)]


def test_each_agent_sees_the_conversation_from_its_own_side(people: tuple[Project, Project]) -> None:
    ada = FakeBackend([("[Analysis] I recall the Engine. [Response] The Engine has no pretensions to originate "
                        "anything."), "Still, it only does what we order it to perform."])
    marie = FakeBackend(["[Response] In the laboratory we trust what we can measure."])
    turns = list(talk.converse(agents(people, ada, marie), TOPIC, 3))
    assert [t.speaker for t in turns] == ["Ada Lovelace", "Marie Curie", "Ada Lovelace"]
    assert turns[0].text.startswith("The Engine") and turns[0].analysis == "I recall the Engine."
    first, later = ada.calls[0], ada.calls[1]
    assert isinstance(first, list) and isinstance(later, list)
    assert first[0].content.startswith("You are Ada Lovelace. It is 1843.") and TOPIC in first[1].content
    assert "You speak first." in first[1].content
    assert [m.role for m in later] == ["system", "user", "assistant", "user"]
    assert later[2].content == turns[0].text  # its own turn, without the analysis
    assert later[3].content == "Marie Curie: In the laboratory we trust what we can measure."
    seen_by_marie = marie.calls[0]
    assert isinstance(seen_by_marie, list) and seen_by_marie[0].content.startswith("You are Marie Curie. It is 1911.")
    assert seen_by_marie[-1].content.endswith("Ada Lovelace: " + turns[0].text)


def test_no_agent_speaks_for_another(people: tuple[Project, Project]) -> None:
    yours = "**Marie:** I concede everything."  # all of it someone else's line
    ada = FakeBackend(["Ada Lovelace: The Engine weaves algebraic patterns.\nMarie Curie: How lovely, I agree.",
                       yours, yours])
    marie = FakeBackend(["Perhaps. Lovelace: yes, perhaps."])
    turns = list(talk.converse(agents(people, ada, marie), TOPIC, 3))
    assert turns[0].text == "The Engine weaves algebraic patterns." and turns[0].cut
    assert turns[1].text == "Perhaps." and turns[1].cut
    assert turns[2].text == "" and turns[2].cut and len(ada.calls) == 3  # asked twice, still empty: left empty
    assert all("Curie:" not in t.text and "Lovelace:" not in t.text for t in turns)


def test_next_speaker_policies(people: tuple[Project, Project]) -> None:
    ada, marie = people
    members = [(ada, "young", "base"), (ada, "mature", "base"), (marie, "laureate", "base")]
    trio = talk.open_agents(members, lambda p, v: FakeBackend())
    assert [a.name for a in trio] == ["Ada Lovelace (1835)", "Ada Lovelace (1843)", "Marie Curie"]
    said = talk.Turn(0, trio[0].name, "young", "base", "Tell me, Marie Curie, and you too, Ada Lovelace (1843)?",
                     "", "", "opening", False)
    assert talk.next_speaker(trio, [said], "addressed", TOPIC) == (1, "addressed")  # the last one named
    plain = talk.Turn(0, trio[0].name, "young", "base", "Nobody is named here.", "", "", "opening", False)
    assert talk.next_speaker(trio, [plain], "addressed", TOPIC) == (1, "round_robin")
    assert talk.next_speaker(trio, [plain], "model", TOPIC, FakeBackend(["Next: Marie Curie"])) == (2, "model")
    for reply in ("Next: Ada Lovelace (1835)", "Next: Nobody", "Marie Curie", "Next: Marie Curie\nNext: Ada"):
        assert talk.next_speaker(trio, [plain], "model", TOPIC, FakeBackend([reply])) == (1, "fallback")


def test_stance_by_judge_with_strict_parsing_and_by_similarity(people: tuple[Project, Project]) -> None:
    pair = agents(people, FakeBackend(), FakeBackend())
    texts = ["Machines cannot think; the Engine only follows orders.", "Radium glows and we measure it.",
             "The Engine follows orders and cannot think for itself.", "We measure radium; measurement decides."]
    turns = [talk.Turn(i, pair[i % 2].name, "", "base", t, "", t, "x", False) for i, t in enumerate(texts)]
    judge = FakeBackend(["Stance: against", "I think they are neutral", "**Stance:** against", "nonsense",
                         "still nonsense", "Stance: for"])
    report = talk.track_stance(TOPIC, pair, turns, judge)
    ada, marie = report.agents
    assert report.method == "judge:fake"
    assert ada.labels == ("against", "against") and ada.verdict == "consistent" and ada.score == 1.0
    assert marie.labels == (None, "for") and marie.verdict == "undetermined"  # unparseable twice = missing
    flip = talk.track_stance(TOPIC, pair, turns, FakeBackend(["Stance: for", "Stance: against"]))
    assert flip.agents[0].verdict == "inconsistent" and flip.agents[0].score == 0.5
    lexical = talk.track_stance(TOPIC, pair, turns)
    assert lexical.method == "tfidf" and [a.verdict for a in lexical.agents] == ["consistent", "consistent"]
    swapped = [talk.Turn(i, pair[i % 2].name, "", "base", texts[[0, 1, 3, 2][i]], "", "", "x", False)
               for i in range(4)]
    assert [a.verdict for a in talk.track_stance(TOPIC, pair, swapped).agents] == ["inconsistent", "inconsistent"]


def test_transcripts_are_written_as_jsonl_and_markdown(people: tuple[Project, Project], tmp_path: Path) -> None:
    pair = agents(people, FakeBackend(["I hold my view."]), FakeBackend(["And I mine."]))
    turns = tuple(talk.converse(pair, TOPIC, 4, mode="collaboration"))
    conversation = talk.Conversation(TOPIC, "collaboration", "round_robin", tuple(pair), turns,
                                     talk.track_stance(TOPIC, pair, turns))
    jsonl, md = talk.write_transcript(conversation, tmp_path / "t")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["type"] for r in rows] == ["meta", "turn", "turn", "turn", "turn", "stance"]
    assert "**Ada Lovelace**: I hold my view." in md.read_text() and "## Stance report" in md.read_text()


def test_agent_targets_parse() -> None:
    assert parse_target("examples/ada-lovelace@mature:dpo") == (Path("examples/ada-lovelace"), "mature", "dpo")
    assert parse_target("proj:base") == (Path("proj"), None, "base")
    assert parse_target("proj@young") == (Path("proj"), "young", None)
    assert parse_target(str(EXAMPLES / "marie-curie")) == (EXAMPLES / "marie-curie", None, None)


def persllm(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the tiny model runs fastest on one thread of busy shared cores
    return subprocess.run([sys.executable, "-m", "persllm", "converse", *args], check=False, capture_output=True, text=True,
                          timeout=300, env=env)


def test_converse_cli_with_two_example_personas_on_the_tiny_model(tiny_model: Path, tmp_path: Path) -> None:
    result = persllm(f"{EXAMPLES / 'ada-lovelace'}@mature:base", f"{EXAMPLES / 'marie-curie'}:base",
                     "--topic", TOPIC, "--turns", "4", "--max-tokens", "24", "--set", f"base_model=hf:{tiny_model}",
                     "--out", str(tmp_path / "talk"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "talk" / "transcript.jsonl").read_text().splitlines()]
    names = [a["name"] for a in rows[0]["agents"]]
    assert names == ["Ada Lovelace", "Marie Curie"]
    turns = [r for r in rows if r["type"] == "turn"]
    assert [t["speaker"] for t in turns] == names * 2  # every turn has exactly one speaker, in turn
    for turn in turns:
        for other in (n for n in names if n != turn["speaker"]):
            assert not re.search(rf"(^|\n)\s*{other}\s*:", turn["text"])
    stance = rows[-1]
    assert stance["type"] == "stance" and [a["name"] for a in stance["agents"]] == names
    assert all(a["verdict"] in ("consistent", "inconsistent", "undetermined") for a in stance["agents"])
    assert "## Stance report" in (tmp_path / "talk" / "transcript.md").read_text()
    assert "Stance consistency" in result.stderr


def test_converse_cli_errors(project_dir: Path, tmp_path: Path) -> None:
    missing = persllm(str(tmp_path / "nope"), str(project_dir), "--topic", "x")
    assert missing.returncode == 1 and "no persona.yaml found" in missing.stderr
    stage = persllm(f"{project_dir}@middle", str(EXAMPLES / "ada-lovelace"), "--topic", "x")
    assert stage.returncode == 1 and "unknown stage 'middle'" in stage.stderr and "early, late" in stage.stderr
    adapter = persllm(f"{project_dir}:sft", str(EXAMPLES / "ada-lovelace"), "--topic", "x")
    assert adapter.returncode == 1 and "no SFT adapter" in adapter.stderr and "persllm train" in adapter.stderr
    alone = persllm(str(project_dir), "--topic", "x")
    assert alone.returncode == 1 and "at least two agents" in alone.stderr


def test_prompt_messages_are_the_training_format(people: tuple[Project, Project]) -> None:
    pair = agents(people, FakeBackend(), FakeBackend())
    messages = talk.agent_messages(pair[1], pair, [], TOPIC, "debate")
    assert [type(m) for m in messages] == [Message, Message] and messages[0].role == "system"
    assert "Marie Curie" in messages[1].content and "never write anyone else's lines" in messages[1].content
