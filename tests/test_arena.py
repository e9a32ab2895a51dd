"""`persllm arena`: held-out questions, stored answers, anonymised ballots, votes under concurrency, Bradley-Terry
results, CSV export, a real headless Chromium, and the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_for_http

from persllm.arena import ArenaStore, heldout_questions, prepare, standings
from persllm.arena.app import create_arena_app
from persllm.arena.rank import bradley_terry, votes_csv
from persllm.arena.store import Question, Vote
from persllm.backends.fake import FakeBackend
from persllm.config import Project, load_project
from persllm.errors import DataError
from persllm.serve import serve_in_thread
from persllm.types import Sample, to_record
from persllm.workspace import Workspace, write_jsonl

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def construct_outputs(project: Project) -> list[Sample]:
    """A finished construct stage with three held-out and two training samples."""
    samples = [Sample(id=f"s{i}", persona=project.name, stage=("early", "late")[i % 2], time_label="",
                      kind="ordinary", question=f"Question number {i} about turbines?", analysis="a", response="r",
                      seed_id=f"p{i}", split="test" if i < 3 else "train") for i in range(5)]
    ws = Workspace(project.output)
    write_jsonl(ws.stage_dir("construct") / "samples.jsonl", (to_record(s) for s in samples))
    ws.finish("construct", "test-fingerprint")
    return samples


def model_answers(project: Project, variant: str) -> FakeBackend:
    """Distinct, recognisable answers per model, with an analysis that must never reach the page."""
    return FakeBackend(lambda request: f"[Analysis] secret reasoning [Response] Reply of kind {variant.upper()} to "
                                       f"{request[-1].content}")  # type: ignore[index,union-attr]


@pytest.fixture
def arena(project_dir: Path) -> tuple[Project, ArenaStore]:
    project = load_project(project_dir)
    construct_outputs(project)
    store = ArenaStore(project.output / "arena" / "arena.sqlite")
    opened = []

    def opener(p: Project, variant: str) -> FakeBackend:
        opened.append(variant)
        return model_answers(p, variant)

    made = prepare(project, store, ["base", "dpo"], heldout_questions(project, 10), opener=opener)
    assert made == {"base": 3, "dpo": 3} and opened == ["base", "dpo"]
    again = prepare(project, store, ["base", "dpo"], heldout_questions(project, 10), opener=opener)
    assert again == {"base": 0, "dpo": 0} and opened == ["base", "dpo"]  # nothing to do: no model loaded
    return project, store


@pytest.fixture
def server(arena: tuple[Project, ArenaStore]) -> Iterator[str]:
    with serve_in_thread(create_arena_app(*arena, ["base", "dpo"])) as url:
        yield url


def test_questions_come_from_the_held_out_split_and_ballots_are_anonymised(arena: tuple[Project, ArenaStore]) -> None:
    _, store = arena
    assert {q.question for q in store.questions()} == {f"Question number {i} about turbines?" for i in range(3)}
    ballot = store.ballot(["base", "dpo"])
    assert ballot is not None and {ballot.left_model, ballot.right_model} == {"base", "dpo"}
    assert "secret" not in ballot.left_answer + ballot.right_answer
    store.vote(ballot.token, "tie", "both fine")
    with pytest.raises(DataError, match="already been voted"):
        store.vote(ballot.token, "left")
    with pytest.raises(DataError, match="unknown ballot"):
        store.vote("forged", "left")
    sides = {store.ballot(["base", "dpo"]).left_model for _ in range(30)}  # type: ignore[union-attr]
    assert sides == {"base", "dpo"}  # the order is random


def test_bradley_terry_and_win_rates() -> None:
    q = Question("q", "early", "?")
    votes = [Vote(i, q, "a", "b", "left" if i < 8 else "right", "", 0.0) for i in range(10)]
    votes += [Vote(10 + k, q, "b", "c", ("left", "left", "tie")[k], "", 0.0) for k in range(3)]
    votes += [Vote(13, q, "c", "a", "right", "", 0.0)]
    rows = standings(votes, samples=100)
    assert [r.model for r in rows] == ["a", "b", "c"] and [r.rank for r in rows] == [1, 2, 3]
    a = rows[0]
    assert (a.games, a.wins, a.losses, a.ties) == (11, 9, 2, 0) and a.win_rate == pytest.approx(9 / 11)
    assert all(r.low <= r.rating <= r.high for r in rows) and rows[0].low > rows[2].low
    assert sum(bradley_terry(votes, ["a", "b", "c"]).values()) == pytest.approx(3000)  # mean 1000 by construction
    assert votes_csv(votes).splitlines()[0].startswith("vote_id,created_utc,question_id")


def test_20_concurrent_votes_are_all_stored(arena: tuple[Project, ArenaStore], server: str) -> None:
    _, store = arena
    tokens = [httpx.get(f"{server}/api/ballot").json()["token"] for _ in range(20)]

    def post(index: int) -> int:
        if index % 2:
            return httpx.post(f"{server}/vote", json={"token": tokens[index], "choice": "A"}).status_code
        return httpx.post(f"{server}/vote", data={"token": tokens[index], "choice": "tie", "comment": f"c{index}"},
                          follow_redirects=False).status_code

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(post, range(20)))
    assert sorted(codes) == [200] * 10 + [303] * 10
    votes = store.votes()
    assert len(votes) == 20 and {v.comment for v in votes if v.choice == "tie"} == {f"c{i}" for i in range(0, 20, 2)}
    results = httpx.get(f"{server}/api/results").json()
    assert results["votes"] == 20 and sum(r["games"] for r in results["standings"]) == 40
    ranking = httpx.get(f"{server}/results.csv").text.splitlines()
    assert ranking[0].startswith("rank,model,games") and len(ranking) == 3
    assert len(httpx.get(f"{server}/votes.csv").text.splitlines()) == 21


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium (/usr/bin/chromium) is not installed; "
                                                  "`apt-get install chromium` to run the browser test")
def test_vote_in_a_real_browser_and_see_it_in_the_results(arena: tuple[Project, ArenaStore], server: str) -> None:
    from playwright.sync_api import sync_playwright

    _, store = arena
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            question = page.inner_text("#question")
            assert question in {q.question for q in store.questions()}
            a, b = page.inner_text("#answer-a"), page.inner_text("#answer-b")
            assert question in a and question in b and "secret" not in a + b and "Test Person" in page.title()
            fields = page.eval_on_selector_all("form [name]", "els => els.map(e => e.name)")
            assert sorted(set(fields)) == ["choice", "comment", "token"]  # nothing on the page names the models
            token = page.get_attribute("input[name=token]", "value")
            page.fill("#comment", "A sounds like her")
            page.click("#vote-a")
            page.wait_for_selector("#notice")
            assert "vote was recorded" in page.inner_text("#notice")
            page.goto(server + "/results")
            assert page.inner_text("#total") == "1 vote"
            (vote,) = store.votes()
            assert vote.choice == "left" and vote.comment == "A sounds like her"
            assert "REPLY OF KIND " + vote.left_model.upper() in a.upper()  # A really was the left model
            rows = {r.split("\t")[1]: r.split("\t") for r in page.inner_text("#ranking").splitlines()[1:]}
            assert rows[vote.left_model][3] == "1" and rows[vote.right_model][4] == "1"  # wins, losses
            assert store.ballot(["base", "dpo"]) is not None and token
        finally:
            browser.close()


def persllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "persllm", "arena", *args], check=False, capture_output=True, text=True,
                          timeout=120)


def test_arena_cli_export_and_errors(arena: tuple[Project, ArenaStore], project_dir: Path, tmp_path: Path) -> None:
    _, store = arena
    ballot = store.ballot(["base", "dpo"])
    assert ballot is not None
    store.vote(ballot.token, "right")
    done = persllm(str(project_dir), "--export", str(tmp_path / "ranking.csv"))
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "ranking.csv").read_text().splitlines()) == 3
    assert len((tmp_path / "ranking.votes.csv").read_text().splitlines()) == 2
    missing = persllm(str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no persona.yaml found" in missing.stderr
    one = persllm(str(project_dir))
    assert one.returncode == 1 and "at least two models" in one.stderr
    adapter = persllm(str(project_dir), "--models", "base,dpo")
    assert adapter.returncode == 1 and "no DPO adapter" in adapter.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        busy = persllm(str(project_dir), "--models", "base,fake", "--port", port)
    assert busy.returncode == 1 and "in use" in busy.stderr


def test_arena_cli_prepares_answers_and_serves(project_dir: Path, tiny_model: Path) -> None:
    project = load_project(project_dir)
    construct_outputs(project)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "persllm", "arena", str(project_dir), "--models", "base,fake",
                                "--set", f"base_model=hf:{tiny_model}", "--max-tokens", "6", "--port", str(port)],
                               env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        page = wait_for_http(f"http://127.0.0.1:{port}/", process, timeout=120)
        assert page is not None, process.stderr.read() if process.poll() is not None else "no answer in 120 s"
        assert 'id="question"' in page.text
        store = ArenaStore(project.output / "arena" / "arena.sqlite")
        assert store.models() == ["base", "fake"] and len(store.questions()) == 3
    finally:
        process.terminate()
        process.wait(timeout=30)
