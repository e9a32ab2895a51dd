"""`general:` in persona.yaml: built-in set, messages JSONL, save_to_disk datasets, datasets.load_dataset sources;
seeded size sampling, skipped rows, the deprecated construct.general_data alias, fingerprints and SFT mix stats."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from conftest import MINIMAL_YAML, write_project
from persllm import general as general_mod
from persllm.config import load_project
from persllm.errors import ConfigError, DataError
from persllm.general import load_general
from persllm.train.data import build_sft_records
from persllm.types import Message, Sample


def conversation(i: int, turns: int = 1) -> list[dict[str, str]]:
    out = []
    for t in range(turns):
        out += [{"role": "user", "content": f"question {i}.{t}"}, {"role": "assistant", "content": f"answer {i}.{t}"}]
    return out


def project_with(root: Path, general_yaml: str, overrides: list[str] | None = None):
    write_project(root, MINIMAL_YAML + general_yaml)
    return load_project(root, overrides=overrides)


def write_jsonl(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"g{i}", "messages": conversation(i)}) + "\n" for i in range(n)),
                    encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No dataset cached from another test; datasets' own cache in tmp; never the network."""
    monkeypatch.setattr(general_mod, "_CACHE", {})
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


# -- built-in and JSONL ---------------------------------------------------------------------------------------------
def test_default_is_the_builtin_set(tmp_path: Path) -> None:
    project = project_with(tmp_path / "p", "")
    records, source = load_general(project)
    assert source.kind == "builtin" and source.name == "general_en.jsonl"
    assert len(records) == source.available == source.used == 60 and source.skipped == 0
    assert records[0].id == "en-001" and records[0].known_since == -3000
    # an explicitly empty `general:` is the same
    records_empty, source_empty = load_general(project_with(tmp_path / "q", "general:\n"))
    assert source_empty == source and records_empty == records


def test_jsonl_by_string_and_mapping(tmp_path: Path) -> None:
    root = tmp_path / "p"
    write_jsonl(root / "data" / "general.jsonl", 12)
    records, source = load_general(project_with(root, "general: data/general.jsonl\n"))
    assert source.kind == "jsonl" and source.name == "data/general.jsonl" and source.used == 12
    assert [r.id for r in records] == [f"g{i}" for i in range(12)]
    mapped = project_with(root, "general:\n  source: data/general.jsonl\n  size: 5\n")
    picked, source = load_general(mapped)
    assert source.size == 5 and source.used == 5 and source.available == 12
    ids = [r.id for r in picked]
    assert ids == sorted(ids, key=lambda x: int(x[1:]))  # file order
    assert [r.id for r in load_general(mapped)[0]] == ids  # seeded: the same every time
    other = load_project(root, overrides=["seed=7"])
    assert [r.id for r in load_general(other)[0]] != ids


def test_jsonl_keeps_strict_line_errors(tmp_path: Path) -> None:
    root = tmp_path / "p"
    path = write_jsonl(root / "general.jsonl", 3)
    path.write_text(path.read_text() + json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(DataError, match=r"general.jsonl:4: "):
        load_general(project_with(root, "general: general.jsonl\n"))


def test_override_of_a_string_general_keeps_its_source(tmp_path: Path) -> None:
    root = tmp_path / "p"
    write_jsonl(root / "general.jsonl", 10)
    project = project_with(root, "general: general.jsonl\n", overrides=["general.size=4"])
    assert project.general.source == "general.jsonl" and project.general.size == 4
    assert load_general(project)[1].used == 4


# -- datasets saved to disk ----------------------------------------------------------------------------------------
INVALID_ROWS: list[Any] = [
    [{"role": "user", "content": "unanswered"}],                                        # ends with the user
    [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],          # wrong order
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}],         # empty answer
    [],                                                                                 # nothing
]


def dataset_rows(n: int, invalid_every: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        bad = invalid_every and i % invalid_every == invalid_every - 1
        rows.append({"messages": INVALID_ROWS[i % len(INVALID_ROWS)] if bad else conversation(i, 1 + i % 2),
                     "prompt_id": f"p{i}"})
    return rows


def test_saved_dataset_with_invalid_rows_skipped_and_counted(tmp_path: Path) -> None:
    from datasets import Dataset

    root = tmp_path / "p"
    rows = dataset_rows(12, invalid_every=4)  # rows 3, 7, 11 invalid
    rows[0]["messages"] = [{"role": "system", "content": "be kind"}, *rows[0]["messages"]]  # system turns dropped
    Dataset.from_list(rows).save_to_disk(str(root / "gen_ds"))
    records, source = load_general(project_with(root, "general: gen_ds\n"))
    assert source.kind == "disk" and source.split == "" and source.available == 12
    assert source.used == 9 and source.skipped == 3
    assert [r.id for r in records][:4] == ["gen_ds:0", "gen_ds:1", "gen_ds:2", "gen_ds:4"]
    assert [m.role for m in records[0].messages] == ["user", "assistant"]
    assert len(records[1].messages) == 4  # multi-turn kept whole


def test_saved_dataset_dict_split_and_field(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    root = tmp_path / "p"
    train = [{"conv": conversation(i)} for i in range(6)]
    test = [{"conv": conversation(100 + i)} for i in range(3)]
    DatasetDict({"train_sft": Dataset.from_list(train), "test_sft": Dataset.from_list(test)}).save_to_disk(
        str(root / "dd"))
    records, source = load_general(project_with(root, "general: {source: dd, split: test_sft, field: conv}\n"))
    assert source.kind == "disk" and source.split == "test_sft" and source.used == 3
    assert records[0].id == "dd:test_sft:0" and records[0].instruction == "question 100.0"
    with pytest.raises(DataError, match=r"no split 'train'.*train_sft, test_sft"):
        load_general(project_with(root, "general: {source: dd, field: conv}\n"))
    with pytest.raises(DataError, match=r"no column 'messages'.*conv.*general.field"):
        load_general(project_with(root, "general: {source: dd, split: train_sft}\n"))


def test_size_sampling_is_seeded_and_reads_only_what_it_needs(tmp_path: Path) -> None:
    from datasets import Dataset

    root = tmp_path / "p"
    Dataset.from_list(dataset_rows(2000, invalid_every=5)).save_to_disk(str(root / "big"))  # 400 invalid rows
    project = project_with(root, "general: {source: big, size: 20}\n")
    records, source = load_general(project)
    assert source.used == len(records) == 20 and source.available == 2000
    assert 0 < source.skipped < 40  # only rows drawn until 20 valid ones were found, not all 400 invalid ones
    ids = [int(r.id.split(":")[-1]) for r in records]
    assert ids == sorted(ids) and all(i % 5 != 4 for i in ids)
    general_mod._CACHE.clear()
    assert [r.id for r in load_general(project)[0]] == [r.id for r in records]
    other = load_project(root, overrides=["seed=1"])
    assert {r.id for r in load_general(other)[0]} != {r.id for r in records}


# -- datasets.load_dataset (the Hugging Face id code path, run on a local data directory) --------------------------
def test_load_dataset_path_on_a_local_data_directory(tmp_path: Path) -> None:
    root = tmp_path / "p"
    data = root / "ultra"
    data.mkdir(parents=True)
    for split, n in (("train", 8), ("test", 3)):  # load_dataset names the splits after the files
        rows = dataset_rows(n, invalid_every=4)
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    project = project_with(root, "general:\n  source: ultra\n  size: 4\n")
    records, source = load_general(project)
    assert source.kind == "hub" and source.split == "train" and source.available == 8
    assert source.used == 4 and all(r.id.startswith("ultra:train:") for r in records)
    records, source = load_general(project_with(root, "general: {source: ultra, split: test}\n"))
    assert source.used == 3 and [r.id for r in records] == ["ultra:test:0", "ultra:test:1", "ultra:test:2"]
    with pytest.raises(DataError, match=r"could not load 'ultra' \(split 'validation'\)"):
        load_general(project_with(root, "general: {source: ultra, split: validation}\n"))


def test_hub_id_failure_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def offline(path: str, split: str | None = None, **_: Any) -> Any:
        calls.append((path, split))
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/ultrachat_200k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    project = project_with(tmp_path / "p", "general: {source: HuggingFaceH4/ultrachat_200k, split: train_sft}\n")
    assert project.general.locate(project.root) == ("hub", None)
    with pytest.raises(DataError) as err:
        load_general(project)
    assert calls == [("HuggingFaceH4/ultrachat_200k", "train_sft")]
    message = str(err.value)
    assert "ConnectionError" in message and "HF_DATASETS_OFFLINE" in message and "dataset id" in message


def test_hub_dataset_is_loaded_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake(path: str, split: str | None = None, **_: Any) -> Any:
        calls.append(path)
        return datasets.Dataset.from_list(dataset_rows(50))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    project = project_with(tmp_path / "p", "general: {source: someone/chats, size: 10}\n")
    first = load_general(project)
    assert load_general(project) == first and calls == ["someone/chats"]
    assert first[1].kind == "hub" and first[0][0].id.startswith("someone/chats:train:")


# -- the deprecated alias and validation ---------------------------------------------------------------------------
def test_construct_general_data_still_works_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "p"
    write_jsonl(root / "old.jsonl", 4)
    project = project_with(root, "construct:\n  general_data: old.jsonl\n")
    with caplog.at_level(logging.WARNING, logger="persllm.general"):
        records, source = load_general(project)
        load_general(project)
    assert source.kind == "jsonl" and [r.id for r in records] == ["g0", "g1", "g2", "g3"]
    warnings = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warnings) == 1 and "general: old.jsonl" in warnings[0].getMessage()
    missing = project_with(tmp_path / "q", "construct:\n  general_data: nowhere.jsonl\n")
    with pytest.raises(DataError, match="construct.general_data: .*nowhere.jsonl not found"):
        load_general(missing)
    with pytest.raises(ConfigError, match="remove construct.general_data"):
        project_with(root, "general: old.jsonl\nconstruct:\n  general_data: old.jsonl\n")


@pytest.mark.parametrize(("general_yaml", "message"), [
    ("general: {source: x.jsonl, size: -1}\n", "general.size must be 0"),
    ("general: {source: HuggingFaceH4/ultrachat_200k, split: ''}\n", "general.split must name a split"),
    ("general: {source: a/b, sise: 3}\n", "unknown key 'general.sise' (did you mean 'size'?)"),
    ("general: data/genral.jsonl\n", "'data/genral.jsonl' not found"),
    ("general: ./nothing_here\n", "not found"),
    ("general: not a dataset id\n", "neither a file or directory"),
    ("general: [1, 2]\n", "general: expected a path or a dataset id, or a mapping"),
])
def test_config_errors(tmp_path: Path, general_yaml: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        project_with(tmp_path / "p", general_yaml)
    assert message in str(err.value)


# -- fingerprints --------------------------------------------------------------------------------------------------
def test_digest_follows_source_split_size_and_data(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    from persllm.pipeline import _general_digest
    from persllm.types import stable_id

    builtin = project_with(tmp_path / "b", "")
    records, _ = load_general(builtin)
    assert _general_digest(builtin) == stable_id(*(r.id + r.instruction + r.reference for r in records))  # unchanged
    root = tmp_path / "p"
    DatasetDict({"train": Dataset.from_list(dataset_rows(30)), "other": Dataset.from_list(dataset_rows(30))}) \
        .save_to_disk(str(root / "dd"))
    digests = {_general_digest(project_with(root, text)) for text in (
        "general: dd\n", "general: {source: dd, split: other}\n", "general: {source: dd, size: 10}\n",
        "general: {source: dd, size: 11}\n")}
    assert len(digests) == 4
    before = _general_digest(project_with(root, "general: dd\n"))
    rows = dataset_rows(30)
    rows[5]["messages"][-1]["content"] = "a changed answer"
    DatasetDict({"train": Dataset.from_list(rows), "other": Dataset.from_list(rows)}).save_to_disk(str(root / "dd2"))
    (root / "dd").rename(root / "dd-old")
    (root / "dd2").rename(root / "dd")
    assert _general_digest(project_with(root, "general: dd\n")) != before


# -- SFT mix -------------------------------------------------------------------------------------------------------
def make_sample(i: int) -> Sample:
    return Sample(id=f"test-person-{i}", persona="test-person", stage="early", time_label="1900", kind="ordinary",
                  question=f"What did you build in {1890 + i}?", analysis=f"About {1890 + i}.",
                  response=f"A small turbine, number {i}.", seed_id="p1", split="train")


@pytest.mark.parametrize(("repeat", "ratio", "n_samples"), [(5, 0.25, 7), (3, 0.5, 4), (1, 1.3, 9), (5, 0.0, 3)])
def test_sft_realised_ratio_matches_general_ratio(tmp_path: Path, repeat: int, ratio: float, n_samples: int) -> None:
    from datasets import Dataset

    root = tmp_path / "p"
    Dataset.from_list(dataset_rows(40)).save_to_disk(str(root / "ds"))
    project = project_with(root, "general: {source: ds, size: 12}\n",
                           overrides=[f"sft.repeat={repeat}", f"sft.general_ratio={ratio}"])
    records, source = load_general(project)
    _, counts = build_sft_records(project, [make_sample(i) for i in range(n_samples)],
                                  [list(r.messages) for r in records], source)
    assert counts["personified"] == repeat * n_samples
    assert counts["general_ratio"] == ratio
    assert abs(counts["general_ratio_realised"] - ratio) <= 0.5 / counts["personified"] + 1e-4
    assert counts["general_repeated"] == (counts["general"] > 12)
    assert counts["general_distinct"] == min(12, counts["general"])
    assert counts["general_source"] == {"kind": "disk", "name": "ds", "split": "", "size": 12, "available": 40,
                                        "used": 12, "skipped": 0}


def test_sft_stage_reports_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import persllm.train
    from persllm import pipeline
    from persllm.workspace import Workspace

    root = tmp_path / "p"
    write_jsonl(root / "general.jsonl", 6)
    project = project_with(root, "general: {source: general.jsonl, size: 3}\n")
    seen: dict[str, Any] = {}

    def fake_train(project, samples, general, out_dir, progress, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs, general=general)
        _, counts = build_sft_records(project, [make_sample(1)], general, kwargs["general_source"])
        return {"samples": counts}

    monkeypatch.setattr(persllm.train, "train_sft", fake_train)
    monkeypatch.setattr(Workspace, "samples", lambda self: [])
    stats = pipeline._run_sft(project, Workspace.of(project), pipeline.NULL)
    assert len(seen["general"]) == 3 and all(isinstance(m, Message) for c in seen["general"] for m in c)
    assert stats["samples"]["general_source"]["kind"] == "jsonl"
    assert stats["samples"]["general_source"]["used"] == 3
