"""The judge: strict parsing, retries then missing (never a score), cached repeats, and order-swapped ranking."""

from __future__ import annotations

from pathlib import Path

from persllm.backends.fake import FakeBackend
from persllm.errors import BackendError
from persllm.eval.criteria.base import judged
from persllm.eval.criteria.ranking import ranking
from persllm.eval.judge import Judge, Task, parse_profile, parse_winner, score_parser
from persllm.prompts import load_prompts

PROMPTS = load_prompts("en")
VALUES = {"name": "Ada", "label": "1835", "question": "Q?", "reference": "R.", "answer": "A.", "aspect": "facts"}


def accuracy_task(item: str = "i1", model: str = "m") -> Task:
    return Task("accuracy", model, item, "accuracy", dict(VALUES), score_parser(0, 5), {"aspect": "knowledge"})


def test_strict_parsers() -> None:
    parse = score_parser(0, 5)
    assert parse("Score: 4\nReason: close") == 4
    assert parse("**Score:** 3") == 3
    assert parse("Score: 4/5") == 4
    for bad in ("I would say 4", "Score: 6", "Score: 3\nScore: 4", "Score: four", "", "The score is: 4"):
        assert parse(bad) is None, bad
    assert parse_winner("Winner: B\nReason: x") == "b"
    assert parse_winner("winner: tie") == "tie"
    assert parse_winner("Winner: A\nWinner: B") is None and parse_winner("A is better") is None
    assert parse_profile("O: 4\nC: 3.5\nE: 2\nA: 4\nN: 1") == {"O": 4, "C": 3.5, "E": 2, "A": 4, "N": 1}
    assert parse_profile("O: 4\nC: 3\nE: 2\nA: 4") is None and parse_profile("O: 9\nC: 3\nE: 2\nA: 4\nN: 1") is None


def test_unparseable_is_retried_then_missing_never_a_score(tmp_path: Path) -> None:
    fake = FakeBackend(["I think it is good", "Score: 4", "nonsense", "still nonsense", "no"])
    judge = Judge(fake, PROMPTS, tmp_path / "judge.sqlite", repeats=1, retries=2, seed=7)
    first, second = judge.run([accuracy_task("i1"), accuracy_task("i2")])
    # First attempt for both: i1 gets the unparseable reply, i2 a valid one; i1 is asked twice more.
    assert len(fake.calls) == 4
    assert first.values == (None,) and first.estimate().mean is None
    assert second.values == (4,)
    statuses = [(r["item_id"], r["attempt"], r["status"]) for r in judge.records]
    assert statuses == [("i1", 0, "unparseable"), ("i2", 0, "ok"), ("i1", 1, "unparseable"),
                        ("i1", 2, "unparseable")]
    seeds = [r["seed"] for r in judge.records if r["item_id"] == "i1"]
    assert len(set(seeds)) == 3  # each retry is a new request, not the cached failure
    summary = judged([first, second], lambda o: o.task.meta["aspect"])
    assert summary["knowledge"]["mean"] == 4.0 and summary["knowledge"]["n"] == 1
    assert summary["knowledge"]["missing"] == 1


def test_backend_errors_count_as_missing(tmp_path: Path) -> None:
    fake = FakeBackend([BackendError("boom")])
    judge = Judge(fake, PROMPTS, tmp_path / "judge.sqlite", repeats=1, retries=1)
    (outcome,) = judge.run([accuracy_task()])
    assert outcome.values == (None,)
    assert [r["status"] for r in judge.records] == ["error", "error"]


def test_repeats_are_cached_and_distinct(tmp_path: Path) -> None:
    cache = tmp_path / "judge.sqlite"
    fake = FakeBackend(["Score: 2", "Score: 4", "Score: 3"])
    judge = Judge(fake, PROMPTS, cache, repeats=3, retries=0, seed=1)
    (outcome,) = judge.run([accuracy_task()])
    assert outcome.values == (2, 4, 3)
    estimate = outcome.estimate()
    assert estimate.mean == 3.0 and estimate.low is not None and estimate.low < 3.0 < estimate.high
    assert judge.describe()["seeds"] == [1, 2, 3] and judge.describe()["temperature"] > 0
    again = FakeBackend(["Score: 0"])
    (cached,) = Judge(again, PROMPTS, cache, repeats=3, retries=0, seed=1).run([accuracy_task()])
    assert cached.values == (2, 4, 3) and again.calls == []  # a rerun costs nothing


def pairwise(prefer: str | None) -> list:  # type: ignore[type-arg]
    """Outcomes from a fake judge that picks `prefer`'s answer wherever it is shown, or always 'A' if None."""
    from persllm.eval.criteria.ranking import pairwise_tasks
    from persllm.eval.generate import Answer, ModelUnderTest
    from persllm.eval.runner import ModelRun
    from persllm.types import Sample

    samples = [Sample(f"s{i}", "p", "early", "1900", "ordinary", f"Q{i}?", "", "R.", "seed", split="test")
               for i in range(3)]
    runs = []
    for name in ("base", "dpo"):
        answers = [Answer(name, f"heldout/{s.id}", "heldout", s.id, "p", "early", s.question, f"answer of {name}",
                          f"answer of {name}", 0, 0.0) for s in samples]
        runs.append(ModelRun(ModelUnderTest(name, name, name, local=True), answers))

    class Project:  # only what the prompts need
        name = "Ada"
        language = "en"

        def stage(self, _: str):  # type: ignore[no-untyped-def]
            return type("S", (), {"label": "1900"})()

    tasks = pairwise_tasks(Project(), runs, samples, limit=2)  # type: ignore[arg-type]
    assert len(tasks) == 2 * 2  # two items, each in both orders

    def reply(request):  # type: ignore[no-untyped-def]
        text = request[-1].content
        if prefer is None:
            return "Winner: A"
        a_part = text.split("Answer A:")[1].split("Answer B:")[0]
        return "Winner: A" if f"answer of {prefer}" in a_part else "Winner: B"

    judge = Judge(FakeBackend(reply), PROMPTS, None, repeats=1, retries=0)
    return judge.run(tasks)


def test_ranking_swaps_order_to_cancel_position_bias() -> None:
    biased = ranking(pairwise(None), ["base", "dpo"])
    assert biased["pairs"][0]["ties"] == 2 and biased["pairs"][0]["a_wins"] == 0
    assert biased["models"]["base"]["win_rate"]["mean"] == 0.5
    assert biased["position_consistency"]["mean"] == 0.0
    fair = ranking(pairwise("dpo"), ["base", "dpo"])
    assert fair["pairs"][0]["b_wins"] == 2 and fair["pairs"][0]["a_wins"] == 0
    assert fair["models"]["dpo"]["rank"] == 1 and fair["models"]["dpo"]["win_rate"]["mean"] == 1.0
    assert fair["position_consistency"]["mean"] == 1.0
