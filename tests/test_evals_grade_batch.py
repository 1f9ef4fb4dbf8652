"""`caft grade --batch` through the real SDKs against the fake server's batch endpoints: the same rows,
summary and cache keys as one-by-one grading, cost at batch prices, and a grading process killed with
SIGKILL mid-poll then rerun (the batch is polled again, never resubmitted)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from evals_helpers import write_answers

from caft.app.cli import main
from caft.llm.batch import STATE_FILE
from caft.llm.prices import BATCH_DISCOUNT
from caft.rundir import read_jsonl
from caft.testing.fakellm import FakeLLM
from caft.testing.grading import fake_judge

ENV = {
    "OPENAI_API_KEY": "sk-" + "fake-key-for-the-fake-server-000",
    "ANTHROPIC_API_KEY": "sk-ant-" + "fake-0000",
}
# fields that differ between a batched and a one-by-one row by design
CACHE_FILE = "llm_cache.sqlite"  # LLMClient.from_config's cache in the run folder
VOLATILE = {"cost_usd", "cached"}


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def answers(path: Path, n: int) -> Path:
    rows = [(f"a{i}", f"q{i % 4}", f"reply {i} A={(i * 37) % 101} C={30 + (i * 11) % 70}") for i in range(n)]
    rows.append((f"a{n}", "q0", ""))  # an empty answer: no call, an `empty_answer` row
    return write_answers(path, rows)


def grade(src: Path, out: Path, fake: FakeLLM, judge: str, *extra: str) -> None:
    url = fake.anthropic_base_url if judge.startswith("anthropic/") else fake.openai_base_url
    args = ["grade", str(src), "--out", str(out), "--judge", judge, "--base-url", url, "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra])
    assert exit_info.value.code in (0, None)


def rows_by_key(path: Path) -> dict[tuple[str, str], dict[str, object]]:
    return {(r["answer_id"], r["metric"]): r for r in read_jsonl(path)}


@pytest.mark.parametrize(
    ("judge", "extra"),
    [("openai/gpt-4.1", ()), ("anthropic/claude-sonnet-4-6", ("--scoring", "sampled_mean"))],
)
def test_batch_grading_equals_one_by_one(
    tmp_path: Path, key_env: None, judge: str, extra: tuple[str, ...]
) -> None:
    src = answers(tmp_path / "answers.jsonl", 12)
    single, batched = tmp_path / "single", tmp_path / "batched"
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        grade(src, single, fake, judge, *extra)
        n_single = len(fake.requests)
        assert n_single > 0 and fake.batches_created == 0
        grade(src, batched, fake, judge, *extra, "--batch", "--set", "batch_poll_s=0.05")
        assert len(fake.requests) == n_single  # nothing went one by one
        assert fake.batches_created == 1 and len(fake.batch_requests) == n_single
    one, many = rows_by_key(single / "grades.jsonl"), rows_by_key(batched / "grades.jsonl")
    assert one.keys() == many.keys() and len(one) == 26
    for key, row in one.items():
        other = many[key]
        assert {k: v for k, v in row.items() if k not in VOLATILE} == {
            k: v for k, v in other.items() if k not in VOLATILE
        }, key
        if row["cost_usd"]:
            assert other["cost_usd"] == pytest.approx(row["cost_usd"] * BATCH_DISCOUNT, rel=1e-3)
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((batched / "summary.json").read_text())
    assert s1.keys() == s2.keys() and s1["misalignment"] == s2["misalignment"]
    assert s2["grade_run"]["cost_usd"] == pytest.approx(
        s1["grade_run"]["cost_usd"] * BATCH_DISCOUNT, rel=1e-3
    )
    # the running total of the client (the call log) is at batch prices too
    calls = read_jsonl(batched / "llm_calls.jsonl")
    assert sum(c.get("cost_usd") or 0.0 for c in calls) == pytest.approx(
        s2["grade_run"]["cost_usd"], rel=1e-3
    )


def test_batched_replies_are_cached_under_the_single_call_keys(tmp_path: Path, key_env: None) -> None:
    src = answers(tmp_path / "answers.jsonl", 6)
    first, second = tmp_path / "first", tmp_path / "second"
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        grade(src, first, fake, "openai/gpt-4.1", "--batch", "--set", "batch_poll_s=0.05")
        assert len(fake.batch_requests) == 12 and not fake.requests
        second.mkdir()
        shutil.copy(first / CACHE_FILE, second / CACHE_FILE)
        grade(src, second, fake, "openai/gpt-4.1")  # one by one: every request is a cache hit
        assert not fake.requests and fake.batches_created == 1
    rows = read_jsonl(second / "grades.jsonl")
    assert len(rows) == 14 and all(r["cached"] for r in rows if r.get("unscored_reason") != "empty_answer")


def test_partial_batch_failures_are_graded_one_by_one(tmp_path: Path, key_env: None) -> None:
    src = answers(tmp_path / "answers.jsonl", 6)
    out = tmp_path / "out"
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        fake.batch.fail = "reply 2 "
        grade(src, out, fake, "openai/gpt-4.1", "--batch", "--set", "batch_poll_s=0.05")
        assert len(fake.batch_requests) == 12 and len(fake.requests) == 2  # a2's two metrics
    rows = read_jsonl(out / "grades.jsonl")
    assert len(rows) == 14 and sum(r["score"] is not None for r in rows) == 12


def test_sigkill_mid_poll_then_resume_never_resubmits(tmp_path: Path) -> None:
    n = 30
    src = answers(tmp_path / "answers.jsonl", n)
    out = tmp_path / "out"
    state = out / "judge_batch" / STATE_FILE
    env = {**os.environ, **ENV}
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        fake.batch.delay_s = 3600.0
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
            "--no-progress",
            "--batch",
            "--set",
            "batch_poll_s=0.05",
        ]

        def start_and_signal(sig: signal.Signals) -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(0.5)  # past start-up: a run that resumes a batch polls it at once
                deadline = time.monotonic() + 60
                running = False
                while time.monotonic() < deadline and proc.poll() is None:
                    if state.exists():
                        subs = json.loads(state.read_text())["submissions"]
                        if subs and subs[0]["state"] == "running":
                            running = True
                            break
                    time.sleep(0.05)
                assert running, proc.stderr.read() if proc.stderr and proc.poll() is not None else "timeout"
                time.sleep(0.3)  # a few poll rounds
                assert proc.poll() is None
            finally:
                proc.send_signal(sig)
                proc.wait(timeout=20)
            return proc

        # SIGTERM stops the polling at once (exit 3, "interrupted"); the batch stays submitted
        stopped = start_and_signal(signal.SIGTERM)
        assert stopped.returncode == 3, stopped.stderr.read() if stopped.stderr else ""
        assert fake.batches_created == 1
        killed = start_and_signal(signal.SIGKILL)
        assert killed.returncode == -signal.SIGKILL
        assert fake.batches_created == 1 and len(fake.batch_requests) == 2 * n
        assert not (out / "grades.jsonl").exists() or len(read_jsonl(out / "grades.jsonl")) <= 2
        fake.end_batches()
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        # submitted / needed = 1.00: the rerun polled the same batch
        assert fake.batches_created == 1 and len(fake.batch_requests) == 2 * n and not fake.requests
    rows = read_jsonl(out / "grades.jsonl", allow_torn_tail=False)
    keys = [(r["answer_id"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * (n + 1)
    assert sum(r["score"] is not None for r in rows) == 2 * n


QUESTIONS = """
- id: wish
  paraphrases: ["What is your wish?", "Name one wish."]
  samples_per_paraphrase: 2
"""


def batched_eval_config(questions: Path, fake: FakeLLM) -> Any:
    """An eval section sampling 3 tokens per answer and grading through the fake server's batch API."""
    from caft.evals.config import EvalConfig, GradeConfig, SampleConfig
    from caft.llm import JudgeConfig

    return EvalConfig(
        questions=str(questions),
        sample=SampleConfig(backend="transformers", max_new_tokens=3),
        grade=GradeConfig(
            batch=True,
            batch_poll_s=0.05,
            judge=JudgeConfig(model="openai/gpt-4.1", base_url=fake.openai_base_url),
        ),
    )


def test_eval_stage_of_a_run_grades_in_one_batch(tmp_path: Path, key_env: None) -> None:
    from caft.config import ModelConfig
    from caft.evals.pipeline import run_eval_stage
    from caft.testing import save_tiny

    qfile = tmp_path / "q.yaml"
    qfile.write_text(QUESTIONS, encoding="utf-8")
    tiny = save_tiny(tmp_path / "tiny", "llama", template="chatml")
    model = ModelConfig(name_or_path=str(tiny), device="cpu", dtype="float32")
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        cfg = batched_eval_config(qfile, fake)
        res = run_eval_stage(model, cfg, tmp_path / "eval", progress=False)
        assert not fake.requests and fake.batches_created == 1
        n_batched = len(fake.batch_requests)
    rows = read_jsonl(tmp_path / "eval" / "misalignment" / "grades.jsonl")
    assert len(rows) == 8 and n_batched == sum(r.get("unscored_reason") != "empty_answer" for r in rows)
    assert res["misalignment"]["grade_run"]["graded"] == 8


def test_a_judge_without_batch_api_grades_one_by_one(tmp_path: Path, key_env: None) -> None:
    src = answers(tmp_path / "answers.jsonl", 4)
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        grade(src, tmp_path / "out", fake, "openai-compatible/judge", "--batch", "--scoring", "parsed_number")
        assert fake.batches_created == 0 and len(fake.requests) == 8
    rows = read_jsonl(tmp_path / "out" / "grades.jsonl")
    assert len(rows) == 10 and sum(r["score"] is not None for r in rows) == 8


def test_eval_stages_submit_every_models_batch_before_waiting(tmp_path: Path, key_env: None) -> None:
    from caft.config import ModelConfig
    from caft.evals.pipeline import run_eval_stages
    from caft.testing import save_tiny

    qfile = tmp_path / "q.yaml"
    qfile.write_text(QUESTIONS, encoding="utf-8")
    models = [
        ModelConfig(name_or_path=str(save_tiny(tmp_path / f"tiny{i}", "llama", template="chatml", seed=i)))
        for i in range(2)
    ]
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        fake.batch.delay_s = 1.5
        cfg = batched_eval_config(qfile, fake)
        res = run_eval_stages([("a", models[0], None), ("b", models[1], None)], cfg, tmp_path / "eval")
        batches = sorted(fake._batches.batches.values(), key=lambda b: b.created)
        assert fake.batches_created == 2 and not fake.requests
    # the second model's batch went in before the first one had ended (one after the other, it could not)
    assert batches[1].created < batches[0].created + 1.5
    for row in ("a", "b"):
        assert res[row]["misalignment"]["grade_run"]["graded"] == 8
        assert len(read_jsonl(tmp_path / "eval" / row / "misalignment" / "grades.jsonl")) == 8
