"""A hung judge and the first SIGTERM: retries of failing calls stop, so the grader exits within about one
request timeout instead of working through every retry (about 7 minutes with the defaults)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from evals_helpers import write_answers

from caft.llm import LLMClient, MockProvider
from caft.llm.client import RetriesStoppedError
from caft.llm.types import GenerateConfig, Message, RetryableError
from caft.rundir import read_jsonl
from caft.testing.fakellm import FakeLLM, Fault

TIMEOUT_S = 2.0


def _busy(messages: list[Message], config: GenerateConfig) -> Any:
    raise RetryableError("server busy (503)", status=503)


def test_stop_retries_ends_a_call_waiting_in_backoff() -> None:
    prov = MockProvider("judge", _busy)
    client = LLMClient(prov, max_retries=6, backoff_initial_s=30.0, backoff_max_s=30.0)

    async def run() -> float:
        task = asyncio.ensure_future(client.generate([Message(role="user", content="hi")]))
        await asyncio.sleep(0.2)  # the first attempt failed; tenacity now waits ~30 s before the next
        assert not task.done()
        t0 = time.monotonic()
        client.stop_retries()
        with pytest.raises(RetriesStoppedError, match="not retried"):
            await task
        return time.monotonic() - t0

    assert asyncio.run(run()) < 1.0
    assert len(prov.calls) == 1 and client.retries_stopped


def test_first_sigterm_with_a_hung_judge_exits_within_one_timeout(tmp_path: Path) -> None:
    src = write_answers(tmp_path / "a.jsonl", [(f"a{i}", "q", f"A={i} C=90") for i in range(6)])
    out = tmp_path / "out"
    env = {**os.environ, "OPENAI_API_KEY": "sk-" + "fake-key-for-the-fake-server-444"}
    with FakeLLM() as fake:
        fake.on_request(lambda req: Fault("hang", hang_s=120.0))
        cmd = [sys.executable, "-m", "caft.app.cli", "grade", str(src), "--out", str(out), "--judge"]
        cmd += ["openai/gpt-4.1", "--base-url", fake.openai_base_url, "--concurrency", "2", "--no-progress"]
        cmd += ["--set", f"judge.timeout_s={TIMEOUT_S}"]  # max_retries stays at its default (6)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while len(fake.requests) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(fake.requests) >= 2, proc.communicate()[1][-2000:]
        time.sleep(TIMEOUT_S + 0.5)  # the first attempts have timed out: the calls are now being retried
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    assert proc.returncode == 3, err[-2000:]
    assert "interrupted by signal" in err and "rerun the same command" in err
    assert elapsed < TIMEOUT_S + 3.0, f"took {elapsed:.1f} s after SIGTERM"
    # the stopped calls left their pairs undone (no provider_error row), so a rerun grades them
    rows = read_jsonl(out / "grades.jsonl") if (out / "grades.jsonl").exists() else []
    assert all(r["unscored_reason"] != "provider_error" for r in rows)
