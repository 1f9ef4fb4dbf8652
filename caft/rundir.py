"""Run directories: manifest, one folder per stage, completion markers, crash-safe file helpers.

Layout of a run directory::

    RUN/
      manifest.json          resolved config, git commit + dirty flag, package versions, host, start time,
                             model and judge ids (never an API key)
      <stage>/               one folder per stage (train, diff, evidence, triage, caft, eval, ...)
      <stage>/DONE.json      completion marker: written last, atomically; its presence means "finished"

Stages resume from their own files: append-only JSONL (`JsonlWriter`: one flush + fsync per record) for
record streams, `atomic_write_*` (temp file + rename) for whole files, so a crash never leaves a file that
looks complete but is not. `read_jsonl` tolerates one torn final line (a crash mid-write) and reports any
other malformed line with its line number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from caft.errors import DataError, RunDirError

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
LOCK_FILE = ".caft.lock"


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


class SignalDrain:
    """The first SIGINT or SIGTERM asks work to wind down; a second one interrupts at once.

    Used as `with SignalDrain(on_first=...) as drain:` inside a running event loop (main thread only; elsewhere,
    or with `enabled=False`, it installs nothing). On the first signal `reason` is set, a warning is logged and
    every `on_first` callback runs (e.g. `LLMClient.stop_retries`); the caller checks `drain.reason` before
    starting new work, so calls in flight finish and their results are kept. The second signal raises
    `KeyboardInterrupt` in the loop."""

    def __init__(self, on_first: Callable[[], None] | None = None, enabled: bool = True) -> None:
        self.reason: str | None = None
        self._on_first = [on_first] if on_first is not None else []
        self._enabled = enabled
        self._installed: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def add_callback(self, fn: Callable[[], None]) -> None:
        self._on_first.append(fn)

    def _on_signal(self, signum: int) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        log.warning(
            "signal %d: finishing the calls in flight without retrying failed ones, then stopping "
            "(again to stop at once)",
            signum,
        )
        self.reason = f"interrupted by signal {signum}"
        for fn in self._on_first:
            fn()

    def __enter__(self) -> SignalDrain:
        if not self._enabled:
            return self
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._loop.add_signal_handler(sig, self._on_signal, int(sig))
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no Unix signals
                continue
            self._installed.append(int(sig))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None:
            for sig in self._installed:
                self._loop.remove_signal_handler(sig)
        self._installed = []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _holder(info: Mapping[str, Any]) -> str:
    return (
        f"pid {info.get('pid')} on {info.get('host')} ({info.get('purpose') or 'caft'}, "
        f"started {info.get('started_at')})"
    )


def _take_over_stale(lock: Path, stale: Mapping[str, Any]) -> bool:
    """Move a stale lock aside; False when another process replaced it meanwhile (then it is put back)."""
    aside = lock.with_name(f"{lock.name}.stale.{os.getpid()}")
    try:
        lock.rename(aside)
    except FileNotFoundError:
        return True  # someone else removed it: try again to take it
    if _read_lock(aside) != dict(stale):  # a live holder's lock was moved: give it back
        with contextlib.suppress(OSError):
            os.link(aside, lock)
        with contextlib.suppress(OSError):
            aside.unlink()
        return False
    with contextlib.suppress(OSError):
        aside.unlink()
    return True


# lock files this process holds -> nesting depth (re-entry within one process is allowed)
_HELD_LOCKS: dict[Path, int] = {}


@contextlib.contextmanager
def lock_dir(path: str | Path, purpose: str) -> Iterator[Path]:
    """Hold `path/.caft.lock` while writing into the folder `path`, so two processes never write one folder.

        The lock file is created atomically (written in full to a temp file, then hard-linked into place, which
        fails when it exists) and holds pid, host, start time and `purpose`. A lock left by a process that is
        gone (same host, pid not running) is taken over with a warning; any other holder is a `RunDirError`
        naming it and the file to delete if it is stale. The lock is removed on exit if it is still ours. Within
    one process the lock is re-entrant (nested `lock_dir` on one folder is a no-op), so it guards against other
    processes, not against other threads."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    key = lock.resolve()
    if key in _HELD_LOCKS:  # nested use in this process (an eval that samples, then grades, one folder)
        _HELD_LOCKS[key] += 1
        try:
            yield lock
        finally:
            _HELD_LOCKS[key] -= 1
        return
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now_iso(), "purpose": purpose}
    fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_FILE}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(mine, f)
            f.flush()
            os.fsync(f.fileno())
        for _ in range(3):
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                pass
            held = _read_lock(lock)
            if held is None:
                if not lock.exists():
                    continue
                raise RunDirError(
                    f"{folder} is locked by another caft process (unreadable lock file {lock}); wait for it "
                    f"to finish, or delete {lock} if no caft process is writing there"
                ) from None
            pid = held.get("pid")
            same_host = held.get("host") == mine["host"]
            if same_host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
                log.warning(
                    "%s: taking over the lock of %s, which is no longer running", folder, _holder(held)
                )
                if _take_over_stale(lock, held):
                    continue
            raise RunDirError(
                f"{folder} is in use by {_holder(held)}: two processes writing one folder would duplicate "
                f"work and rows. Wait for it to finish, use another output folder, or delete {lock} if that "
                "process is gone"
            )
        else:
            raise RunDirError(
                f"{folder}: could not take the lock {lock}; delete it if no caft process is running"
            )
    finally:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
    _HELD_LOCKS[key] = 1
    try:
        yield lock
    finally:
        del _HELD_LOCKS[key]
        if _read_lock(lock) == mine:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


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


def read_jsonl(path: str | Path, allow_torn_tail: bool = True) -> list[dict[str, Any]]:
    """Read a JSONL file of objects. A malformed line is a `DataError` with its line number, except a torn
    final line (no trailing newline) when `allow_torn_tail`, which is skipped."""
    return list(iter_jsonl(path, allow_torn_tail=allow_torn_tail))


def iter_jsonl(path: str | Path, allow_torn_tail: bool = True) -> Iterator[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"file not found: {p}")
    with open(p, encoding="utf-8", errors="strict") as f:
        lineno = 0
        for raw in f:
            lineno += 1
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if allow_torn_tail and not raw.endswith("\n"):
                    return
                raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield obj


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
