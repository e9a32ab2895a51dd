"""General instruction data: the built-in set, a `messages` JSONL, a `datasets` save_to_disk directory or a Hugging
Face dataset, as named by `general:` in persona.yaml (or the deprecated construct.general_data)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from persllm.config import GeneralConfig, Project
from persllm.errors import DataError
from persllm.types import Message

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # project roots already warned about construct.general_data
_CACHE: dict[tuple[Any, ...], tuple[tuple[GeneralRecord, ...], GeneralSource]] = {}  # loaded datasets, this process
_CACHE_SIZE = 2
_CHUNK = 1024  # dataset rows converted to Python per step


@dataclass(frozen=True)
class GeneralRecord:
    """One general conversation (user/assistant turns) and, if known, the year its answer became knowable."""

    id: str
    messages: tuple[Message, ...]
    known_since: int | None = None

    @property
    def instruction(self) -> str:
        """The first user turn."""
        return self.messages[0].content

    @property
    def reference(self) -> str:
        """The first assistant turn."""
        return self.messages[1].content


@dataclass(frozen=True)
class GeneralSource:
    """Where a project's general conversations came from, and how many of them were taken."""

    kind: str
    """builtin (the set shipped for the language), jsonl, disk (a save_to_disk directory) or hub (read by
    datasets.load_dataset: a Hugging Face id or a local data directory)."""
    name: str
    """The source as written in persona.yaml, or the built-in file's name."""
    split: str
    """Split read ("" where none applies)."""
    size: int
    """Conversations requested (0 = all)."""
    available: int
    """Rows in the source (its split)."""
    used: int
    """Conversations returned."""
    skipped: int
    """Dataset rows read and skipped: not a user/assistant alternation ending with the assistant."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for stats."""
        return dataclasses.asdict(self)


def general_config(project: Project) -> GeneralConfig:
    """`general:`, or the deprecated construct.general_data standing in for it (with a warning, once per project)."""
    legacy = project.construct.general_data
    if project.general.source or not legacy:
        return project.general
    if str(project.root) not in _WARNED:
        _WARNED.add(str(project.root))
        log.warning("construct.general_data is deprecated: write `general: %s` at the top level of %s/persona.yaml",
                    legacy, project.root)
    return GeneralConfig(source=legacy)


def load_general(project: Project) -> tuple[list[GeneralRecord], GeneralSource]:
    """The project's general conversations (at most general.size, chosen with the seed) and where they came from."""
    config = general_config(project)
    kind, path = config.locate(project.root)
    key = (kind, str(path or config.source), config.split, config.size, config.field, project.seed, project.language,
           _signature(path))
    hit = _CACHE.get(key)
    if hit is None:
        records, source = _load(project, config, kind, path)
        hit = (tuple(records), source)
        if kind in ("disk", "hub"):  # construct, sft and both fingerprints ask for it: read a big dataset once
            while len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = hit
    return list(hit[0]), hit[1]


def _load(project: Project, config: GeneralConfig, kind: str,
          path: Path | None) -> tuple[list[GeneralRecord], GeneralSource]:
    where = "general" if project.general.source else "construct.general_data"
    if kind == "missing":
        raise DataError(f"{where}: {path} not found; give a messages JSONL, a datasets save_to_disk directory or a "
                        "Hugging Face dataset id")
    if kind in ("builtin", "jsonl"):
        if kind == "builtin":
            name = f"general_{project.language}.jsonl"
            records = parse_general(resources.files("persllm.data").joinpath(name).read_text(encoding="utf-8"), name)
        else:
            assert path is not None
            name = config.source
            records = parse_general(path.read_text(encoding="utf-8"), str(path))
        chosen = [records[i] for i in _sorted_choice(len(records), config.size, project.seed)]
        return chosen, GeneralSource(kind, name, "", config.size, len(records), len(chosen), 0)
    dataset, split = _open_dataset(config, kind, path, project.root)
    return _from_dataset(dataset, config, kind, split, project.seed)


def _open_dataset(config: GeneralConfig, kind: str, path: Path | None, root: Path) -> tuple[Any, str]:
    """The split to read (a datasets.Dataset) and its name ("" for a saved Dataset, which has no splits)."""
    import datasets

    if kind == "disk":
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # any failure is reported with what to do
            raise DataError(f"general: could not read the saved dataset {path} ({_first_line(exc)}); it must be a "
                            "directory written by datasets Dataset.save_to_disk or DatasetDict.save_to_disk") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if config.split not in loaded:
                raise DataError(f"general: {config.source!r} has no split {config.split!r}; set general.split to one "
                                f"of {', '.join(loaded)}")
            return loaded[config.split], config.split
        return loaded, ""
    target = str(path) if path is not None else config.source
    try:
        loaded = datasets.load_dataset(target, split=config.split)
    except Exception as exc:  # network, unknown id or split, offline mode without a cached copy
        local = "" if path is not None else f"; if you meant a local path, {(root / config.source)} does not exist"
        raise DataError(f"general: could not load {config.source!r} (split {config.split!r}) with "
                        f"datasets.load_dataset: {_first_line(exc)}. Check the dataset id and split on "
                        "huggingface.co and the network connection (with HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1 "
                        "only datasets already in the local cache load), or point general: at a local messages "
                        f"JSONL or save_to_disk directory{local}") from exc
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"general: {config.source!r} did not load as one table (got {type(loaded).__name__}); "
                        "set general.split to one split such as train")
    return loaded, config.split


def _from_dataset(dataset: Any, config: GeneralConfig, kind: str, split: str,
                  seed: int) -> tuple[list[GeneralRecord], GeneralSource]:
    """Up to general.size valid conversations, drawn in a seeded order; invalid rows are skipped and counted."""
    if config.field not in dataset.column_names:
        raise DataError(f"general: {config.source!r} has no column {config.field!r} (columns: "
                        f"{', '.join(dataset.column_names)}); set general.field to the column holding the turns")
    columns = [c for c in (config.field, "known_since") if c in dataset.column_names]
    dataset = dataset.select_columns(columns)
    available, wanted = len(dataset), config.size or len(dataset)
    prefix = f"{config.source}:{split}:" if split else f"{config.source}:"
    found: list[tuple[int, GeneralRecord]] = []
    skipped = 0
    for indices in _index_chunks(available, config.size, seed, lambda: wanted - len(found)):
        rows = dataset.select(indices)[0:len(indices)]
        knowns = rows.get("known_since") or [None] * len(indices)
        for index, value, known in zip(indices, rows[config.field], knowns):
            turns = _dataset_turns(value)
            if turns is None:
                skipped += 1
                continue
            found.append((index, GeneralRecord(id=f"{prefix}{index}", messages=turns,
                                               known_since=int(known) if isinstance(known, (int, float))
                                               and not isinstance(known, bool) else None)))
            if len(found) >= wanted:
                break
    if not found:
        raise DataError(f"general: no usable conversations in {config.source!r} ({skipped} rows skipped); each row's "
                        f"{config.field!r} must be a list of {{role, content}} turns alternating user/assistant and "
                        "ending with the assistant")
    if skipped:
        log.info("general: skipped %d of %d rows read from %s (not a user/assistant conversation)", skipped,
                 skipped + len(found), config.source)
    records = [record for _, record in sorted(found, key=lambda pair: pair[0])]
    return records, GeneralSource(kind, config.source, split, config.size, available, len(records), skipped)


def _index_chunks(available: int, size: int, seed: int, missing: Callable[[], int]) -> Iterator[list[int]]:
    """Row indices to read, chunk by chunk while `missing()` conversations are still needed: every row in order
    when size is 0 (or not below the rows available), else a seeded permutation, so only about `size` rows of a big
    dataset are ever converted to Python."""
    order = _permutation(available, seed) if size and size < available else None
    start = 0
    while start < available and missing() > 0:
        stop = min(available, start + min(max(missing(), 16), _CHUNK))
        yield [int(i) for i in order[start:stop]] if order is not None else list(range(start, stop))
        start = stop


def _sorted_choice(available: int, size: int, seed: int) -> list[int]:
    """All indices, or the first `size` of the seeded permutation (as for datasets), in file order."""
    if not size or size >= available:
        return list(range(available))
    return sorted(int(i) for i in _permutation(available, seed)[:size])


def _permutation(available: int, seed: int) -> Any:
    """A seeded shuffle of range(available) (numpy's PCG64, as Dataset.shuffle uses: the same on every platform)."""
    import numpy as np

    return np.random.default_rng(seed).permutation(available)


def _dataset_turns(value: Any) -> tuple[Message, ...] | None:
    """A dataset row's turns without system messages, or None unless they alternate user/assistant, end with the
    assistant and all have non-empty string content."""
    if not isinstance(value, (list, tuple)):
        return None
    turns = [m for m in value if not (isinstance(m, dict) and m.get("role") == "system")]
    if not turns or not all(isinstance(m, dict) for m in turns) or _turns_problem(turns):
        return None
    return tuple(Message(m["role"], m["content"]) for m in turns)


def _turns_problem(turns: list[dict[str, Any]]) -> str:
    """What is wrong with user/assistant turns (system turns already removed), or ""."""
    roles = [m.get("role") for m in turns]
    if not turns or roles != ["user", "assistant"] * (len(turns) // 2) or len(turns) % 2:
        return "turns must alternate user/assistant and end with the assistant"
    if any(not isinstance(m.get("content"), str) or not m["content"].strip() for m in turns):
        return "every message needs non-empty string content"
    return ""


def _signature(path: Path | None) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of the files under a local source (a change invalidates the cache)."""
    if path is None:
        return ()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(":. ")


def parse_general(text: str, source: str) -> list[GeneralRecord]:
    """Parse `messages` JSONL; every problem names the file and line."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}:{number}: not valid JSON ({exc.msg})") from exc
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError(f"{source}:{number}: expected {{\"messages\": [{{\"role\": \"user\", ...}}, "
                            "{\"role\": \"assistant\", ...}]}")
        turns = [m for m in messages if isinstance(m, dict) and m.get("role") != "system"]
        problem = _turns_problem(turns)
        if problem:
            raise DataError(f"{source}:{number}: {problem}")
        known = data.get("known_since")
        records.append(GeneralRecord(id=str(data.get("id") or f"general-{number}"),
                                     messages=tuple(Message(m["role"], m["content"]) for m in turns),
                                     known_since=int(known) if isinstance(known, (int, float)) else None))
    if not records:
        raise DataError(f"{source}: no general conversations found")
    return records
