"""Data construction: kinds, provenance, leak-free split, temporal conditioning, faults, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import EXAMPLES
from persllm import template
from persllm import text as T
from persllm.backends.cache import CachedBackend
from persllm.backends.fake import FakeBackend
from persllm.backends.fakeserver import FakeServer
from persllm.backends.openai_compat import OpenAICompatible
from persllm.config import load_project
from persllm.construct import construct
from persllm.construct import facts as F
from persllm.ingest import ingest
from persllm.pipeline import run
from persllm.types import Sample
from persllm.workspace import Workspace


def _check_sample(sample: Sample, stage_ids: set[str]) -> None:
    assert sample.kind in ("ordinary", "opinion", "induced", "general")
    assert sample.stage in stage_ids and sample.time_label
    assert sample.question.strip() and sample.analysis.strip() and sample.response.strip()
    for part in (sample.analysis, sample.response):
        assert "[Analysis]" not in part and "[Response]" not in part
    assert "lorem ipsum" not in sample.response and "lorem ipsum" not in sample.question
    if sample.kind != "general":
        assert sample.seed_id and sample.context_ids and sample.split in ("train", "test")


def test_grounded_construct_covers_every_kind_and_stage() -> None:
    project = load_project(EXAMPLES / "ada-lovelace", preset="demo")
    passages, _ = ingest(project)
    result = construct(project, passages, FakeBackend(["not usable"]))
    stage_ids = {s.id for s in project.stages}
    for sample in result.samples:
        _check_sample(sample, stage_ids)
    kinds = Counter((s.stage, s.kind) for s in result.samples)
    for stage in stage_ids:
        for kind in ("ordinary", "opinion", "induced", "general"):
            assert kinds[(stage, kind)] > 0, (stage, kind)
    stats = result.stats
    assert stats["mode"] == "grounded"
    assert set(stats["by_kind"]) == {"ordinary", "opinion", "induced", "general"}
    # the fake teacher's outputs are all rejected, so every part must come from rules, and the stats must say so
    assert stats["origins"].get("question:teacher", 0) == 0 and stats["origins"]["question:template"] > 0
    assert sum(stats["rejected"].values()) > 0 and "teacher_usage" in stats
    assert {n.type for n in result.negatives} == {"other_stage", "non_personified", "induced"}


def test_seeds_that_cannot_carry_their_kind_get_the_other_kind() -> None:
    from persllm.construct.plan import make_plan

    project = load_project(EXAMPLES / "lu-xun", preset="demo")
    passages, _ = ingest(project)
    result = construct(project, passages, FakeBackend(["not usable"]))
    planned = {f"{project.slug}/{s.id}": s for s in make_plan(project, passages)}
    split_of_seed = {s.seed.id: s.split for s in planned.values()}
    extra = [s for s in result.samples if s.kind != "general" and s.id not in planned]
    assert extra and len(extra) == result.stats["second_choices"]["kept"]
    for sample in extra:  # ordinary <-> opinion on the same seed, in that seed's split
        assert sample.kind in ("ordinary", "opinion")
        assert sample.split == split_of_seed[sample.seed_id]
    assert result.stats["second_choices"]["tried"] >= len(extra)


def test_induced_samples_correct_the_premise() -> None:
    project = load_project(EXAMPLES / "ada-lovelace", preset="demo")
    passages, _ = ingest(project)
    samples = construct(project, passages, FakeBackend(["x"])).samples
    wrong = [s for s in samples if s.meta.get("premise") == "wrong_fact"]
    assert wrong
    material = " ".join(p.text for p in passages)
    for sample in wrong:
        assert sample.meta["false_value"] in sample.question
        assert sample.meta["truth"] in sample.response  # the answer states the true fact
        assert sample.meta["false_value"] in sample.analysis and "false premise" in sample.analysis.lower()
        # the false sentence follows a lead ("Everyone knows that soon after ..."): no capital it did not need
        for sentence in T.sentences(sample.question):
            words = sentence.split()
            for before, word, after in zip(words[:-1], words[1:], [*words[2:], ""], strict=True):
                if word[:1].isupper():
                    assert (word == "I" or F.named_inside(word.strip(",.?"), material)
                            or before[:1].isupper() or after[:1].isupper()), (word, sample.question)
    identity = [s for s in samples if s.meta.get("premise") == "identity"]
    assert identity and all("Ada Lovelace" in s.response for s in identity)


def test_split_is_leak_free_and_contexts_stay_in_stage() -> None:
    project = load_project(EXAMPLES / "marie-curie", preset="demo")
    passages, _ = ingest(project)
    samples = construct(project, passages, FakeBackend(["x"])).samples
    personified = [s for s in samples if s.kind != "general"]
    train_seeds = {s.seed_id for s in personified if s.split == "train"}
    test_seeds = {s.seed_id for s in personified if s.split == "test"}
    assert train_seeds and test_seeds and not train_seeds & test_seeds
    by_id = {p.id: p for p in passages}
    held_out_style = {sid for sid in test_seeds if by_id[sid].kind == "style"}
    for sample in samples:
        assert all(by_id[c].stage == sample.stage for c in sample.context_ids)  # temporal conditioning
        if sample.split == "train" or sample.kind == "general":
            assert not set(sample.context_ids) & held_out_style  # the persona's held-out words stay unseen
            for sid in held_out_style:
                assert by_id[sid].text not in sample.response


def test_full_method_with_faulty_http_teacher(tmp_path: Path, project_dir: Path) -> None:
    with FakeServer(latency=0.0, fault_rate=0.3, timeout_seconds=1.5) as server:
        project = load_project(project_dir, overrides=[f"teacher=openai:scripted@{server.url}",
                                                       "construct.questions_per_passage=2", "construct.attempts=4"])
        passages, _ = ingest(project)
        teacher = CachedBackend(OpenAICompatible("scripted", base_url=server.url, timeout=1.0, max_retries=2,
                                                 concurrency=8, base_delay=0.01), tmp_path / "cache.sqlite")
        result = construct(project, passages, teacher)
    assert result.stats["mode"] == "full"
    assert result.samples, result.stats
    for sample in result.samples:
        _check_sample(sample, {"early", "late"})
    rejected = result.stats["rejected"]
    assert sum(rejected.values()) > 0
    assert set(rejected) & {"not_a_question", "empty", "missing_analysis_tag", "backend_error", "empty_response"}
    assert result.stats["teacher_usage"]["retries"] > 0
    assert result.stats["origins"]["question:teacher"] > 0


def test_full_method_prompts_carry_time_material_and_warning(project_dir: Path) -> None:
    project = load_project(project_dir, overrides=["teacher=fake", "construct.mode=full"])
    passages, _ = ingest(project)
    def reply(request):  # type: ignore[no-untyped-def]
        system, user = request[0].content, request[-1].content
        if any(word in system for word in ("interview", "misleading", "openers")):
            return f"What did you think when {' '.join(user.split()[-6:]).rstrip('.')}?"  # distinct per seed
        return "[Analysis] The user asks. [Response] I learned a great deal there, believe me."

    fake = FakeBackend(reply)
    result = construct(project, passages, fake)
    answer_prompts = [r for r in fake.calls if not isinstance(r, str) and "knows (experiences and knowledge)" in
                      r[0].content and "Now it is" in r[0].content]
    assert answer_prompts
    late = [r for r in answer_prompts if "Now it is 1930" in r[0].content]
    assert late and all("Siemens Ring" in r[0].content or "Berlin" in r[0].content for r in late)
    assert any("this user's message is misleading" in r[0].content for r in answer_prompts)
    assert all(s.analysis == "The user asks." for s in result.samples if s.kind != "general")


def _ids(out: Path) -> list[str]:
    return sorted(json.loads(line)["id"] for line in (out / "construct" / "samples.jsonl").read_text().splitlines())


def test_sigkill_midway_then_resume_gives_the_same_samples(tmp_path: Path, project_dir: Path) -> None:
    with FakeServer(latency=0.05) as server:
        args = ["--set", f"teacher=openai:scripted@{server.url}", "--set", "teacher.concurrency=2",
                "--set", "construct.questions_per_passage=3"]
        reference = subprocess.run([sys.executable, "-m", "persllm", "construct", str(project_dir), "--output",
                                    str(tmp_path / "ref"), *args], capture_output=True, text=True, timeout=300, check=False)
        assert reference.returncode == 0, reference.stderr
        expected = _ids(tmp_path / "ref")
        requests_for_full_run = server.requests
        assert requests_for_full_run > 20 and server.max_in_flight == 2  # the run really used this teacher

        before = server.requests
        proc = subprocess.Popen([sys.executable, "-m", "persllm", "construct", str(project_dir), "--output",
                                 str(tmp_path / "killed"), *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while server.requests - before < requests_for_full_run // 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "killed" / "construct" / "manifest.json").exists()
        done_before_kill = server.requests - before

        resumed = subprocess.run([sys.executable, "-m", "persllm", "construct", str(project_dir), "--output",
                                  str(tmp_path / "killed"), *args], capture_output=True, text=True, timeout=300, check=False)
        assert resumed.returncode == 0, resumed.stderr
        asked_again = server.requests - before - done_before_kill
    ids = _ids(tmp_path / "killed")
    assert ids == expected and len(ids) == len(set(ids))
    assert asked_again < requests_for_full_run  # finished items came from the cache, not the teacher


def test_rerun_skips_and_deleting_a_stage_redoes_only_it(tmp_path: Path, project_dir: Path) -> None:
    project = load_project(project_dir, overrides=["teacher=fake", "construct.mode=grounded",
                                                   f"output_dir={tmp_path / 'out'}"])
    first = run(project, ["ingest", "construct"])
    assert [o.skipped for o in first] == [False, False]
    again = run(project, ["ingest", "construct"])
    assert [o.skipped for o in again] == [True, True]
    ws = Workspace.of(project)
    before = ws.samples()
    import shutil

    shutil.rmtree(ws.stage_dir("construct"))
    redo = run(project, ["ingest", "construct"])
    assert [o.skipped for o in redo] == [True, False]
    assert ws.samples() == before
    # editing material re-runs ingest and, because its output changed, construct too
    (project_dir / "late_style.txt").write_text((project_dir / "late_style.txt").read_text()
                                                + "I never trusted a banker who could not fix a motor.\n")
    edited = run(project, ["ingest", "construct"])
    assert [o.skipped for o in edited] == [False, False]


def test_training_prompt_is_the_template(project_dir: Path) -> None:
    project = load_project(project_dir)
    ctx = template.context_for(project, "late")
    messages = template.prompt_messages(ctx, "Who are you?")
    assert messages[0].role == "system" and "It is 1930" in messages[0].content and "Test Person" in messages[0].content
    tokens = load_project(project_dir, overrides=["sft.temporal_labels=tokens"])
    ctx = template.context_for(tokens, "late")
    messages = template.prompt_messages(ctx, "Who are you?")
    assert messages[-1].content == "<TIME-II> Who are you?" and "It is 1930" not in messages[0].content


@pytest.mark.parametrize("text", ["[Analysis] a b\n[Response] c d", "[analysis]: a b [RESPONSE]: c d"])
def test_answer_format_round_trip(text: str) -> None:
    assert template.split_answer(text) == ("a b", "c d")
    assert template.visible_answer(template.format_answer("x", "y")) == "y"
