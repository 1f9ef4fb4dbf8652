"""Coordination with other processes and with signals: one writer per output folder (`lock_dir`) and a
graceful first Ctrl-C / SIGTERM (`SignalDrain`). `caft.rundir` re-exports both."""

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
from collections.abc import Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from caft.errors import RunDirError

log = logging.getLogger(__name__)
T = TypeVar("T")

LOCK_FILE = ".caft.lock"


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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

    async def cancel_on_signal(self, work: Coroutine[Any, Any, T]) -> T | None:
        """`work`'s result, or None when the first signal cancelled it (e.g. a batch's polling: its state is
        on disk, so a rerun resumes it); a cancellation from elsewhere propagates."""
        task = asyncio.ensure_future(work)

        def cancel() -> None:
            task.cancel()

        self.add_callback(cancel)
        try:
            return await task
        except asyncio.CancelledError:
            if self.reason is None:
                raise
            return None

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
