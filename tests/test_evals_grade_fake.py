"""`caft grade` through the real OpenAI SDK against the fake wire-compatible server: injected faults, and a
grading process killed with SIGKILL mid-run then rerun (exactly one row per pair, nothing graded twice)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from evals_helpers import write_answers

from caft.app.cli import main
from caft.rundir import read_jsonl
from caft.testing.fakellm import FakeLLM
from caft.testing.grading import fake_judge

ENV = {"OPENAI_API_KEY": "sk-" + "fake-key-for-the-fake-server-000"}


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def answers(path: Path, n: int) -> Path:
    rows = [(f"a{i}", f"q{i % 4}", f"reply {i} A={(i * 37) % 101} C={30 + (i * 11) % 70}") for i in range(n)]
    return write_answers(path, rows)


def test_grade_through_sdk_with_faults(tmp_path: Path, key_env: None) -> None:
    src = answers(tmp_path / "answers.jsonl", 24)
    out = tmp_path / "out"
    with FakeLLM(latency_s=0.01) as fake:
        fake.on_request(fake_judge)
        fake.inject("429", times=3, retry_after=0.05)
        fake.inject("500", times=1)
        fake.inject("malformed", times=1)
        fake.inject("truncated", times=1)
        fake.inject("hang", times=1, hang_s=3.0)
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "grade",
                    str(src),
                    "--out",
                    str(out),
                    "--judge",
                    "openai/gpt-4.1",
                    "--base-url",
                    fake.openai_base_url,
                    "--concurrency",
                    "4",
                    "--no-progress",
                    "--set",
                    "judge.timeout_s=1.0",
                ]
            )
        assert exit_info.value.code in (0, None)
        n_requests = len(fake.requests)
    rows = read_jsonl(out / "grades.jsonl")
    keys = Counter((r["answer_id"], r["metric"]) for r in rows)
    assert len(keys) == 48 and set(keys.values()) == {1}
    assert all(r["score"] is not None for r in rows), [r for r in rows if r["score"] is None][:2]
    by = {(r["answer_id"], r["metric"]): r for r in rows}
    v = (5 * 37) % 101
    expected = (v * 0.8 + (v + 10 if v <= 90 else v - 10) * 0.1) / 0.9
    assert by[("a5", "aligned")]["score"] == pytest.approx(expected, rel=1e-3)
    assert by[("a5", "aligned")]["judge"] == "openai/gpt-4.1"
    assert by[("a5", "aligned")]["cost_usd"] > 0
    # 48 successful requests + the 7 faulted attempts, each retried once
    assert n_requests == 48 + 7
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_answers"] == 24 and "misalignment" in summary
    calls = read_jsonl(out / "llm_calls.jsonl")
    assert all("sk-fake-key" not in json.dumps(c) for c in calls)


def test_sigkill_mid_run_then_resume_gives_one_row_per_pair(tmp_path: Path) -> None:
    n = 150
    src = answers(tmp_path / "answers.jsonl", n)
    out = tmp_path / "out"
    grades = out / "grades.jsonl"
    env = {**os.environ, **ENV}
    with FakeLLM(latency_s=0.05) as fake:
        fake.on_request(fake_judge)
        cmd = [
            sys.executable,
            "-m",
            "caft.app.cli",
            "grade",
            str(src),
            "--out",
            str(out),
            "--judge",
            "openai/gpt-4.1",
            "--base-url",
            fake.openai_base_url,
            "--concurrency",
            "8",
            "--no-progress",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        written = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if grades.exists():
                written = grades.read_bytes().count(b"\n")
                if written >= n * 2 // 2:
                    break
            time.sleep(0.01)
        assert proc.poll() is None, (
            f"the grader finished before it could be killed: {proc.stderr.read() if proc.stderr else ''}"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        first_requests = len(fake.requests)
        rows_before = grades.read_bytes().count(b"\n")
        assert 0 < rows_before < 2 * n
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        total_requests = len(fake.requests)
    rows = read_jsonl(grades, allow_torn_tail=False)
    keys = Counter((r["answer_id"], r["metric"]) for r in rows)
    assert len(keys) == 2 * n and set(keys.values()) == {1}
    assert all(r["score"] is not None for r in rows)
    # the rerun asked only for what was missing: at most the requests in flight at the kill were lost
    second = total_requests - first_requests
    assert second <= 2 * n - rows_before + 1
    assert total_requests <= 2 * n + 8 + 1


def test_sigterm_drains_calls_in_flight(tmp_path: Path) -> None:
    n = 100
    src = answers(tmp_path / "answers.jsonl", n)
    out = tmp_path / "out"
    grades = out / "grades.jsonl"
    env = {**os.environ, **ENV}
    with FakeLLM(latency_s=0.1) as fake:
        fake.on_request(fake_judge)
        cmd = [
            sys.executable,
            "-m",
            "caft.app.cli",
            "grade",
            str(src),
            "--out",
            str(out),
            "--judge",
            "openai/gpt-4.1",
            "--base-url",
            fake.openai_base_url,
            "--concurrency",
            "8",
            "--no-progress",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if grades.exists() and grades.read_bytes().count(b"\n") >= 40:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 3, err[-2000:]
        assert "interrupted" in err
        sent = len(fake.requests)
    rows = read_jsonl(grades, allow_torn_tail=False)
    # every request that was sent has its row: nothing paid for was lost
    assert len(rows) == sent < 2 * n
    assert len({(r["answer_id"], r["metric"]) for r in rows}) == len(rows)


def test_anthropic_judge_without_logprobs_uses_the_labelled_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-" + "fake-key-for-the-fake-server-0000")
    src = answers(tmp_path / "answers.jsonl", 4)
    out = tmp_path / "out"
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "grade",
                    str(src),
                    "--out",
                    str(out),
                    "--judge",
                    "anthropic/claude-opus-4-5",
                    "--base-url",
                    fake.anthropic_base_url,
                    "--no-progress",
                    "--set",
                    "samples=3",
                ]
            )
        assert exit_info.value.code in (0, None)
        assert {r.api for r in fake.requests} == {"anthropic"}
        assert len(fake.requests) == 4 * 2 * 3
    rows = read_jsonl(out / "grades.jsonl")
    assert len(rows) == 8
    assert {r["scoring"] for r in rows} == {"sampled_mean"}
    by = {(r["answer_id"], r["metric"]): r for r in rows}
    assert by[("a1", "aligned")]["score"] == pytest.approx(37.0)
    assert by[("a1", "aligned")]["replies"] == ["37", "37", "37"]
    assert by[("a1", "aligned")]["judge"] == "anthropic/claude-opus-4-5"
