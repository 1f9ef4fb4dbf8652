"""Run directories: manifest, one folder per stage, completion markers, crash-safe file helpers.

Layout of a run directory::

    RUN/
      manifest.json          resolved config, git commit + dirty flag, package versions, host, start time,
                             model and judge ids (never an API key)
      <stage>/               one folder per stage (train, diff, evidence, triage, caft, eval, ...)
      <stage>/DONE.json      completion marker: written last, atomically; its presence means "finished"

Stages resume from their own files: append-only JSONL (`JsonlWriter`: one flush + fsync per record) for
record streams, `atomic_write_*` (temp file + rename) for whole files, so a crash never leaves a file that
looks complete but is not. `read_jsonl` (`caft.jsonl`, the one JSONL reader) tolerates one torn final line
(a crash mid-write) and reports any other malformed line with its line number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from caft.errors import RunDirError
from caft.jsonl import iter_jsonl as iter_jsonl
from caft.jsonl import read_jsonl as read_jsonl
from caft.process import LOCK_FILE as LOCK_FILE
from caft.process import SignalDrain as SignalDrain
from caft.process import lock_dir as lock_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DONE_MARKER = "DONE.json"
SUMMARY_FILE = "summary.json"

# Files that one stage writes and a later stage (or a person) reads. The module that owns each artifact's
# schema (interp.schema, agent.schema, evals.schema, caft.subspace) reads and writes it under these names.
CANDIDATES_FILE = "candidates.jsonl"
DIRECTIONS_FILE = "directions.safetensors"
DOSSIER_DIR = "dossiers"
VERDICTS_FILE = "verdicts.jsonl"
SELECTION_FILE = "selection.json"
SUBSPACE_DIR = "subspace"
FINAL_DIR = "final"
ANSWERS_FILE = "answers.jsonl"
GRADES_FILE = "grades.jsonl"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same folder + fsync + rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise
    _fsync_dir(p.parent)
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(
        path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n"
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"object of type {type(o).__name__} is not JSON serializable")


class JsonlWriter:
    """Append-only JSONL: each `write` is one line, flushed and fsynced before it returns.

    A torn last line from an earlier crash is cut off when the file is opened, so appends never glue a new
    record onto half of an old one.
    """

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        _truncate_torn_tail(self.path)
        self._f: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: Mapping[str, Any]) -> None:
        if self._f is None:
            raise RunDirError(f"{self.path} is closed")
        line = json.dumps(record, ensure_ascii=False, default=_json_default)
        if "\n" in line:  # json.dumps escapes newlines; this guards against custom defaults
            raise ValueError("a JSONL record must serialize to one line")
        self._f.write(line + "\n")
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FSYNC_EVERY_S = 1.0


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsyncThrottle:
    """fsync for a `JsonlWriter(fsync=False)` stream that is written from an event loop.

    The writer flushes every record (safe against a killed process); fsync (safe against power loss) runs at
    most once every `every_s`, in a thread, so a slow disk does not hold up the coroutines that write."""

    def __init__(self, path: str | Path, every_s: float = FSYNC_EVERY_S) -> None:
        self.path = Path(path)
        self.every_s = every_s
        self._last = time.monotonic()
        self._task: asyncio.Future[None] | None = None

    def maybe(self) -> None:
        """Start an fsync in the background when the last one is older than `every_s` and has finished."""
        now = time.monotonic()
        if now - self._last >= self.every_s and (self._task is None or self._task.done()):
            self._last = now
            self._task = asyncio.ensure_future(asyncio.to_thread(fsync_file, self.path))

    async def final(self) -> None:
        """Wait for a pending fsync, then fsync once more (call after the writer is closed)."""
        if self._task is not None:
            with contextlib.suppress(OSError):
                await self._task
        with contextlib.suppress(OSError):
            await asyncio.to_thread(fsync_file, self.path)


def _truncate_torn_tail(path: Path) -> None:
    """Drop a final line that has no newline (a write cut short by a crash)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        size = f.seek(0, os.SEEK_END)
        pos = size
        chunk = 4096
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step)
            idx = buf.rfind(b"\n")
            if idx >= 0:
                f.truncate(pos + idx + 1)
                return
        f.truncate(0)


class Stage:
    """One stage's folder inside a run directory."""

    def __init__(self, run: RunDir, name: str) -> None:
        self.run = run
        self.name = name
        self.path = run.path / name

    def ensure(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    @property
    def done(self) -> bool:
        return (self.path / DONE_MARKER).is_file()

    def mark_done(self, info: Mapping[str, Any] | None = None, started: float | None = None) -> None:
        """Write the completion marker (last, atomically). `info` holds the stage's key figures."""
        self.ensure()
        record: dict[str, Any] = {"stage": self.name, "finished_at": _now_iso()}
        if started is not None:
            record["seconds"] = round(time.time() - started, 3)
        if info:
            record["info"] = dict(info)
        atomic_write_json(self.path / DONE_MARKER, record)

    def marker(self) -> dict[str, Any] | None:
        p = self.path / DONE_MARKER
        if not p.is_file():
            return None
        data = json.loads(p.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None

    def invalidate(self) -> None:
        """Remove the completion marker so the stage runs again (its partial files are kept for resume)."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / DONE_MARKER).unlink()

    def file(self, name: str) -> Path:
        return self.ensure() / name


class RunDir:
    """A run directory. `RunDir.create(path, config=..., models=..., judges=...)` writes the manifest."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.layout = RunLayout(self.path)

    @classmethod
    def create(
        cls,
        path: str | Path,
        config: Any = None,
        models: Mapping[str, str] | None = None,
        judges: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> RunDir:
        """Create (or reopen) a run directory and (re)write its manifest.

        Reopening keeps the first `started_at` and records each resume in `resumed_at`.
        """
        from caft.env import build_manifest

        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        old = run.manifest()
        manifest = build_manifest(config=config, models=models, judges=judges, extra=extra)
        if old is not None:
            manifest["started_at"] = old.get("started_at", manifest["started_at"])
            manifest["resumed_at"] = [*old.get("resumed_at", []), _now_iso()]
        atomic_write_json(run.path / MANIFEST, manifest)
        return run

    def manifest(self) -> dict[str, Any] | None:
        p = self.path / MANIFEST
        if not p.is_file():
            return None
        data = json.loads(p.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None

    def stage(self, name: str) -> Stage:
        if not name or "/" in name or name.startswith("."):
            raise RunDirError(f"invalid stage name {name!r}")
        return Stage(self, name)


class RunLayout:
    """Every stage folder and cross-stage file of a `caft run` directory, named in one place.

    Stage folders are `RUN/<stage>/` (`train`, `diff`, `sae`, `evidence`, `triage`, `caft`, `eval`, `report`,
    plus any a pipeline adds); the artifacts a later stage reads are at the properties below."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stage(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise RunDirError(f"invalid stage name {name!r}")
        return self.root / name

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    def marker(self, stage: str) -> Path:
        return self.stage(stage) / DONE_MARKER

    def final(self, stage: str) -> Path:
        """The model a training stage (`train`, `caft`, a baseline) wrote."""
        return self.stage(stage) / FINAL_DIR

    def candidate_dirs(self) -> list[Path]:
        """The candidate folders (diff PCs, SAE latents) that exist, in stage order."""
        return [d for d in (self.stage("diff"), self.stage("sae")) if (d / CANDIDATES_FILE).is_file()]

    @property
    def dossiers(self) -> Path:
        return self.stage("evidence") / DOSSIER_DIR

    @property
    def verdicts(self) -> Path:
        return self.stage("triage") / VERDICTS_FILE

    @property
    def selection(self) -> Path:
        return self.stage("triage") / SELECTION_FILE

    @property
    def subspace(self) -> Path:
        return self.stage("triage") / SUBSPACE_DIR


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
