"""The on-disk layout of a project's output folder: where each artifact lives and how it loads, atomic writes, JSONL,
stage manifests for skipping done work, and the lock that lets one process write there at a time."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from persllm.errors import DataError, PersllmError, ProjectLockedError
from persllm.types import Negative, Passage, PreferencePair, Sample, from_record

if TYPE_CHECKING:
    from persllm.config import Project

STAGES: tuple[str, ...] = ("ingest", "construct", "sft", "dpo", "eval")
UPSTREAM: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "construct": ("ingest",),
    "sft": ("construct",),
    "dpo": ("construct", "sft"),
    "eval": ("construct", "sft", "dpo"),  # the most eval reads: pipeline.upstream_of keeps the models evaluated
}
ADAPTER = "adapter"  # a tuned variant's LoRA / QLoRA adapter, under its stage folder
FULL_MODEL = "model"  # a tuned variant's weights after full fine-tuning, under its stage folder
MANIFEST = "manifest.json"
LOCK = ".persllm.lock"
# Records of how a stage ran (its settings, timings, loss curves, smoke test, audit page): shown to people, never read
# as data by a later stage. They vary between byte-identical results (wall-clock seconds), so they stay out of the
# digest that downstream fingerprints fold in, and out of verification (`persllm inspect` rewrites audit.html).
RECORDS = frozenset({"stats.json", "config.yaml", "metrics.jsonl", "curves.png", "smoke.json", "audit.html"})
# adapter_config.json keys PEFT writes from a set, in an order that changes from process to process
_SET_KEYS = ("target_modules", "modules_to_save", "exclude_modules")


@dataclass(frozen=True)
class Manifest:
    """What a finished stage recorded: the fingerprint of its inputs and the sha256 and size of every output file."""

    stage: str
    fingerprint: str
    outputs: dict[str, str]  # relative path -> sha256
    finished_at: float
    content_digest: str = ""  # empty in manifests written before persllm recorded it
    sizes: dict[str, int] = field(default_factory=dict)  # relative path -> bytes, for messages about changes

    @property
    def digest(self) -> str:
        """One hash over the stage's data files; downstream stages fold it into their fingerprints."""
        if self.content_digest:
            return self.content_digest
        # older manifests: the hash they were fingerprinted with, so an upgrade does not retrain what is done
        return hashlib.sha256(json.dumps(self.outputs, sort_keys=True).encode()).hexdigest()

    @property
    def content(self) -> list[str]:
        """The data files among the outputs (relative paths): what is verified and what the digest covers."""
        return [rel for rel in self.outputs if is_content(rel)]


def is_content(relative: str) -> bool:
    """Whether an output file is data a later stage or a user reads, rather than a record of the run."""
    return Path(relative).name not in RECORDS


class Workspace:
    """Paths and bookkeeping for one project's output directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._hashes: dict[tuple[str, int, int, int, int], str] = {}  # files hashed in this run, by identity

    def sha256(self, path: Path) -> str:
        """sha256 of a file, hashed once per run while its inode, size and times stay the same."""
        st = path.stat()
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]

    @classmethod
    def of(cls, project: Project) -> Workspace:
        """The workspace of a project's output folder."""
        return cls(project.output)

    def stage_dir(self, stage: str) -> Path:
        """Directory of one stage's outputs (not created)."""
        return self.root / stage

    # -- artifacts: the one place that knows where each stage's data lives -------------------------------------------
    @property
    def passages_file(self) -> Path:
        """Passages written by ingest."""
        return self.stage_dir("ingest") / "passages.jsonl"

    @property
    def samples_file(self) -> Path:
        """Samples written by construct."""
        return self.stage_dir("construct") / "samples.jsonl"

    @property
    def negatives_file(self) -> Path:
        """DPO negatives written by construct."""
        return self.stage_dir("construct") / "negatives.jsonl"

    @property
    def pairs_file(self) -> Path:
        """DPO pairs (train and test, each record naming its split) written by the dpo stage."""
        return self.stage_dir("dpo") / "pairs.jsonl"

    def adapter_dir(self, variant: str) -> Path:
        """The adapter of a tuned variant (sft, dpo): the folder its stage trains into."""
        return self.stage_dir(variant) / ADAPTER

    def full_model_dir(self, variant: str) -> Path:
        """The fully fine-tuned weights of a tuned variant (training method `full`)."""
        return self.stage_dir(variant) / FULL_MODEL

    @property
    def export_dir(self) -> Path:
        """Default root of `persllm export`: one folder per data format, gguf/ and merged/."""
        return self.root / "export"

    def merged_dir(self, variant: str, root: Path | None = None) -> Path:
        """Where `persllm export --merged` keeps a variant merged into the base model (under `root`, given --to)."""
        return (root or self.export_dir) / "merged" / variant

    def passages(self) -> list[Passage]:
        """The passages ingest wrote."""
        return [from_record(Passage, r) for r in read_jsonl(self.passages_file)]

    def samples(self) -> list[Sample]:
        """The samples construct wrote."""
        return [from_record(Sample, r) for r in read_jsonl(self.samples_file)]

    def negatives(self) -> list[Negative]:
        """The DPO negatives construct wrote."""
        return [from_record(Negative, r) for r in read_jsonl(self.negatives_file)]

    def pairs(self, split: str | None = None) -> list[PreferencePair]:
        """The DPO pairs the dpo stage wrote (optionally one split)."""
        return [from_record(PreferencePair, r) for r in read_jsonl(self.pairs_file)
                if split is None or r.get("split") == split]

    @property
    def cache_dir(self) -> Path:
        """Teacher/judge response caches; survive deleting a stage so re-runs cost nothing."""
        return self.root / "cache"

    def manifest(self, stage: str) -> Manifest | None:
        """The stage's manifest if the stage finished and none of its data files went missing (not yet verified:
        `changed` hashes them)."""
        path = self.stage_dir(stage) / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            manifest = Manifest(data["stage"], data["fingerprint"], dict(data["outputs"]), float(data["finished_at"]),
                                str(data.get("digest", "")), {k: int(v) for k, v in data.get("sizes", {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        stage_dir = self.stage_dir(stage)
        if any(not (stage_dir / rel).is_file() for rel in manifest.content):
            return None
        return manifest

    def changed(self, manifest: Manifest) -> list[str]:
        """The data files of a finished stage whose bytes are no longer what its manifest recorded."""
        stage_dir = self.stage_dir(manifest.stage)
        return [rel for rel in manifest.content if self.sha256(stage_dir / rel) != manifest.outputs[rel]]

    def describe_changes(self, manifest: Manifest, changed: list[str]) -> str:
        """'construct/samples.jsonl (18,408 bytes when construct finished, 18,407 now) changed since ...'."""
        stage_dir = self.stage_dir(manifest.stage)
        parts = []
        for rel in changed:
            now = (stage_dir / rel).stat().st_size
            was = manifest.sizes.get(rel)
            size = f"{was:,} bytes when {manifest.stage} finished, {now:,} now" if was is not None else f"{now:,} bytes"
            parts.append(f"{stage_dir / rel} ({size})")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(manifest.finished_at))
        return (f"{'; '.join(parts)} {'has' if len(parts) == 1 else 'have'} changed since {manifest.stage} finished "
                f"({when}): the sha256 no longer matches its manifest")

    def is_current(self, stage: str, fingerprint: str) -> bool:
        """True when the stage finished with exactly these inputs and its data files are there, byte for byte."""
        manifest = self.manifest(stage)
        return manifest is not None and manifest.fingerprint == fingerprint and not self.changed(manifest)

    def upstream_digests(self, stage: str, upstream: Iterable[str]) -> dict[str, str]:
        """Digests of `upstream`, the stages `stage` reads from; missing or changed output is an error naming the
        command that redoes it."""
        digests: dict[str, str] = {}
        for up in upstream:
            manifest = self.manifest(up)
            if manifest is None:
                raise DataError(f"stage '{stage}' needs the output of '{up}', which is missing in {self.root}; "
                                f"run `persllm {_command_for(up)}` first (or `persllm run`)")
            changed = self.changed(manifest)
            if changed:
                raise DataError(f"stage '{stage}' reads the output of '{up}', but "
                                f"{self.describe_changes(manifest, changed)}; restore the file, or redo '{up}' with "
                                f"`persllm {_command_for(up)} --set on_changed_output=rerun` (or `persllm run`)")
            digests[up] = manifest.digest
        return digests

    def finish(self, stage: str, fingerprint: str, stats: dict[str, Any] | None = None) -> Manifest:
        """Record that `stage` completed: hash every file in its directory and write the manifest last."""
        stage_dir = self.stage_dir(stage)
        if stats is not None:
            write_json(stage_dir / "stats.json", stats)
        files = [p for p in sorted(stage_dir.rglob("*"))
                 if p.is_file() and p.name != MANIFEST and "checkpoint" not in p.relative_to(stage_dir).parts[0]
                 and not p.relative_to(stage_dir).parts[0].startswith(".")]
        outputs = {str(p.relative_to(stage_dir)): self.sha256(p) for p in files}
        sizes = {str(p.relative_to(stage_dir)): p.stat().st_size for p in files}
        digest = content_digest(stage_dir, [rel for rel in outputs if is_content(rel)], self.sha256)
        manifest = Manifest(stage, fingerprint, outputs, time.time(), digest, sizes)
        write_json(stage_dir / MANIFEST, {"stage": stage, "fingerprint": fingerprint, "outputs": outputs,
                                          "sizes": sizes, "digest": digest, "finished_at": manifest.finished_at})
        return manifest

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the output folder's lock for the block: one writer at a time (see `project_lock`)."""
        with project_lock(self.root):
            yield

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


def content_digest(stage_dir: Path, relative: Iterable[str], sha256: Callable[[Path], str] | None = None) -> str:
    """One hash over data files, each by its content alone: byte-identical results give the same digest."""
    parts = {rel: _canonical_sha256(stage_dir / rel, sha256 or file_sha256) for rel in relative}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _canonical_sha256(path: Path, sha256: Callable[[Path], str]) -> str:
    """sha256 of a file's content; adapter_config.json is hashed with sorted keys and its set-valued lists sorted."""
    if path.name == "adapter_config.json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return sha256(path)
        if isinstance(data, dict):
            for key in _SET_KEYS:
                if isinstance(data.get(key), list):
                    data[key] = sorted(data[key], key=str)
            return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return sha256(path)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def project_lock(root: Path) -> Iterator[None]:
    """Hold `root/.persllm.lock` for the block, or fail at once naming the process that holds it.

    The lock is an flock on the file, which the kernel releases when its holder exits, however it exits: a lock left
    by a killed process is simply taken. The file itself stays (deleting it would let two processes lock two
    different files); it holds the holder's PID, host and command, for the message a second process shows.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ProjectLockedError(_locked_message(root, path)) from None
        except OSError as exc:
            os.close(fd)
            raise PersllmError(f"could not lock {path}: {exc.strerror or exc} (the file system may not support "
                               "locks; put the output folder on a local disk with --output)") from exc
        with contextlib.suppress(FileNotFoundError):
            locked, current = os.fstat(fd), path.stat()
            if (locked.st_dev, locked.st_ino) == (current.st_dev, current.st_ino):
                break  # the file we locked is still the one at `path`
        os.close(fd)  # it was deleted or replaced while we waited: lock the new one
    try:
        _write_holder(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale holder for the next reader; the file stays (see above)
        os.close(fd)


def _write_holder(fd: int) -> None:
    """Who holds the lock, for the message of the next process; written in place (replacing the file would split
    the lock), without fsync (it is a courtesy, and a full disk must not stop the run here)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(_command_line())[:300],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)


def _command_line() -> list[str]:
    """The command as the user typed it: `persllm run DIR` rather than `.../python -m persllm run DIR`."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("persllm", "__main__.py"):
        argv[0] = "persllm"
    elif argv and argv[0] == "-c":
        argv[0:1] = ["python", "-c"]
    return argv


def _locked_message(root: Path, path: Path) -> str:
    holder: dict[str, Any] = {}
    for _ in range(20):  # the holder writes its details just after locking: give it a moment
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(path.read_text(encoding="utf-8") or "{}")
        if holder:
            break
        time.sleep(0.05)
    who = "another persllm process"
    pid = holder.get("pid")
    if pid:
        who = f"another persllm process (PID {pid}"
        host = holder.get("host")
        if host and host != socket.gethostname():
            who += f" on {host}"
        elif not _alive(int(pid)):
            who += ", which has exited; a process it started still holds the lock"
        who += f", `{holder.get('command', '?')}`, started {holder.get('started', '?')})"
    stop = f"stop it (kill {pid}) and " if pid else ""
    return (f"{root} is in use: {who} is writing there. Only one persllm command may write to a project's output "
            f"at a time; wait for it to finish, or {stop}run again (finished stages are kept)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    """The process umask, read from /proc where possible (os.umask sets it to read it, which races other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path, directory: bool = False) -> None:
    """Give a file made by mkstemp (0600) or a folder made by mkdtemp (0700) the mode a plain open() or mkdir()
    would have: 0666 or 0777 less the user's umask. Best effort: a file system without Unix modes keeps its own."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


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
        apply_umask(tmp_path)
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
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
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
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
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
        apply_umask(tmp, directory=True)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
