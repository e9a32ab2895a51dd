"""The on-disk layout of a project's output folder: atomic writes, JSONL, and stage manifests for skipping done work."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from persllm.errors import DataError, PersllmError

STAGES: tuple[str, ...] = ("ingest", "construct", "sft", "dpo", "eval")
UPSTREAM: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "construct": ("ingest",),
    "sft": ("construct",),
    "dpo": ("construct", "sft"),
    "eval": ("construct", "sft", "dpo"),  # the most eval reads: pipeline.upstream_of keeps the models evaluated
}
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """What a finished stage recorded: the fingerprint of its inputs and a digest of every output file."""

    stage: str
    fingerprint: str
    outputs: dict[str, str]  # relative path -> sha256
    finished_at: float

    @property
    def digest(self) -> str:
        """One hash over all outputs; downstream stages fold it into their fingerprints."""
        return hashlib.sha256(json.dumps(self.outputs, sort_keys=True).encode()).hexdigest()


class Workspace:
    """Paths and bookkeeping for one project's output directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        """Directory of one stage's outputs (not created)."""
        return self.root / stage

    @property
    def cache_dir(self) -> Path:
        """Teacher/judge response caches; survive deleting a stage so re-runs cost nothing."""
        return self.root / "cache"

    def manifest(self, stage: str) -> Manifest | None:
        """The stage's manifest if the stage finished and none of its outputs went missing."""
        path = self.stage_dir(stage) / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            manifest = Manifest(data["stage"], data["fingerprint"], dict(data["outputs"]), float(data["finished_at"]))
        except (ValueError, KeyError, TypeError):
            return None
        stage_dir = self.stage_dir(stage)
        if any(not (stage_dir / rel).is_file() for rel in manifest.outputs):
            return None
        return manifest

    def is_current(self, stage: str, fingerprint: str) -> bool:
        """True when the stage finished with exactly these inputs and all outputs are still there."""
        manifest = self.manifest(stage)
        return manifest is not None and manifest.fingerprint == fingerprint

    def upstream_digests(self, stage: str, upstream: Iterable[str]) -> dict[str, str]:
        """Digests of `upstream`, the stages `stage` reads from; missing output is an error naming the command."""
        digests: dict[str, str] = {}
        for up in upstream:
            manifest = self.manifest(up)
            if manifest is None:
                raise DataError(f"stage '{stage}' needs the output of '{up}', which is missing in {self.root}; "
                                f"run `persllm {_command_for(up)}` first (or `persllm run`)")
            digests[up] = manifest.digest
        return digests

    def finish(self, stage: str, fingerprint: str, stats: dict[str, Any] | None = None) -> Manifest:
        """Record that `stage` completed: hash every file in its directory and write the manifest last."""
        stage_dir = self.stage_dir(stage)
        if stats is not None:
            write_json(stage_dir / "stats.json", stats)
        outputs = {
            str(p.relative_to(stage_dir)): file_sha256(p)
            for p in sorted(stage_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST and "checkpoint" not in p.relative_to(stage_dir).parts[0]
            and not p.relative_to(stage_dir).parts[0].startswith(".")
        }
        manifest = Manifest(stage, fingerprint, outputs, time.time())
        write_json(stage_dir / MANIFEST, {"stage": stage, "fingerprint": fingerprint, "outputs": outputs,
                                          "finished_at": manifest.finished_at})
        return manifest

    def invalidate(self, stage: str) -> None:
        """Forget that `stage` finished (its outputs stay until overwritten)."""
        with contextlib.suppress(FileNotFoundError):
            (self.stage_dir(stage) / MANIFEST).unlink()


def _command_for(stage: str) -> str:
    return {"sft": "train", "dpo": "train"}.get(stage, stage)


def fingerprint(stage: str, version: str, config: Any, upstream: dict[str, str]) -> str:
    """Hash of everything a stage's result depends on."""
    payload = json.dumps({"stage": stage, "version": version, "config": config, "upstream": upstream},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise _io_error(path, exc) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _io_error(path: Path, exc: OSError) -> PersllmError:
    if exc.errno == errno.ENOSPC:
        return PersllmError(f"no space left on the device while writing {path}; free some space and re-run "
                            "(nothing was overwritten)")
    return PersllmError(f"could not write {path}: {exc.strerror or exc}")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (readers never see half a file)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, pretty-printed."""
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    """Write YAML atomically."""
    write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON lines atomically; return how many were written."""
    count = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
    return count


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a malformed line is an error naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return records


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place, replacing any older one (near-atomic: rename, then delete old)."""
    dst = Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A temp folder beside `target` to fill; it replaces `target` when the block succeeds and is removed otherwise."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
