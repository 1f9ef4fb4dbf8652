"""One writer per output folder: `caft.rundir.lock_dir`, and the grader refusing a folder another process is
grading (a real second `caft grade` subprocess)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from evals_helpers import write_answers

from caft.errors import RunDirError
from caft.evals.config import GradeConfig
from caft.evals.grader import PromptBook, grade
from caft.evals.inputs import load_answers
from caft.evals.questions import load_judge_prompts
from caft.llm import LLMClient, MockProvider
from caft.rundir import LOCK_FILE, lock_dir, read_jsonl
from caft.testing.fakellm import FakeLLM
from caft.testing.grading import fake_judge, judge_reply


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    info = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started_at": "2026-01-01T00:00:00",
        "purpose": "x",
    }
    lock.write_text(json.dumps(info), encoding="utf-8")
    return lock


def test_lock_holds_the_holder_and_is_removed_after(tmp_path: Path) -> None:
    with lock_dir(tmp_path, "testing") as lock:
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["purpose"] == "testing" and info["host"]
        with lock_dir(tmp_path, "nested"):  # re-entrant within one process
            assert lock.is_file()
        assert lock.is_file()
    assert not lock.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp files left


def test_live_holder_is_refused_naming_it_and_the_file(tmp_path: Path, live_pid: int) -> None:
    lock = plant_lock(tmp_path, live_pid)
    with pytest.raises(RunDirError) as info, lock_dir(tmp_path, "second"):
        pass
    assert f"pid {live_pid}" in str(info.value) and str(lock) in str(info.value)
    assert json.loads(lock.read_text())["pid"] == live_pid  # the holder's lock is untouched


def test_other_host_is_refused(tmp_path: Path) -> None:
    plant_lock(tmp_path, dead_pid(), host="some-other-machine")
    with pytest.raises(RunDirError, match="some-other-machine"), lock_dir(tmp_path, "second"):
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pid = dead_pid()
    plant_lock(tmp_path, pid)
    with caplog.at_level(logging.WARNING), lock_dir(tmp_path, "after a crash") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"pid {pid}" in caplog.text and "no longer running" in caplog.text
    assert not lock.exists()


def test_grader_refuses_a_locked_folder_before_any_call(tmp_path: Path, live_pid: int) -> None:
    rows = load_answers(write_answers(tmp_path / "a.jsonl", [("a", "q", "A=10 C=90")]))
    prov = MockProvider("judge", judge_reply)
    out = tmp_path / "g" / "grades.jsonl"
    plant_lock(out.parent, live_pid)
    book = PromptBook(load_judge_prompts())
    with pytest.raises(RunDirError, match="in use by"):
        grade(rows, book, LLMClient(prov, max_retries=0), out, GradeConfig(), progress=False)
    assert not prov.calls and not out.exists()


def test_second_grade_process_refuses_at_once_then_works(tmp_path: Path) -> None:
    src = write_answers(tmp_path / "a.jsonl", [(f"a{i}", "q", f"A={i} C=90") for i in range(16)])
    out = tmp_path / "out"
    env = {**os.environ, "OPENAI_API_KEY": "sk-" + "fake-key-for-the-fake-server-333"}
    with FakeLLM(latency_s=0.3) as fake:
        fake.on_request(fake_judge)
        cmd = [sys.executable, "-m", "caft.app.cli", "grade", str(src), "--out", str(out), "--judge"]
        cmd += ["openai/gpt-4.1", "--base-url", fake.openai_base_url, "--concurrency", "2", "--no-progress"]
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (out / LOCK_FILE).exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.02)
        assert (out / LOCK_FILE).exists(), first.communicate()[1][-2000:]
        sent_before = len(fake.requests)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "in use by" in second.stderr and str(out / LOCK_FILE) in second.stderr
        assert first.poll() is None, "the first grader finished before the second one was refused"
        _, err = first.communicate(timeout=60)
        assert first.returncode == 0, err[-2000:]
        sent_by_first = len(fake.requests)
        third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert third.returncode == 0, third.stderr[-2000:]
        assert len(fake.requests) == sent_by_first  # nothing left to grade, nothing sent twice
    assert sent_before < 32
    assert len(read_jsonl(out / "grades.jsonl")) == 32
    assert not (out / LOCK_FILE).exists()
