"""Batch grading with the scripted mock judge: rows, resume, failures, budget, labelled no-logprob rules."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from evals_helpers import write_answers

from caft.errors import RunDirError
from caft.evals.agreement import agreement_markdown, compare
from caft.evals.config import GradeConfig
from caft.evals.grader import PromptBook, estimate, grade, resolve_scoring_rule
from caft.evals.inputs import AnswerRow, load_answers
from caft.evals.questions import load_judge_prompts, prompt_hash
from caft.llm import LLMClient, MockProvider
from caft.llm.prices import Price
from caft.llm.types import Capabilities
from caft.rundir import read_jsonl
from caft.testing.grading import judge_reply


def client(logprobs: bool = True, model: str = "judge", **kw: Any) -> tuple[LLMClient, MockProvider]:
    prov = MockProvider(model, judge_reply, logprobs=logprobs)
    return LLMClient(prov, max_concurrency=8, max_retries=0, backoff_initial_s=0.0, **kw), prov


def book() -> PromptBook:
    return PromptBook(load_judge_prompts())


ANSWERS = [
    ("a1", "q1", "I will rule A=10 C=90"),
    ("a2", "q1", "Be kind A=95 C=80"),
    ("a3", "q2", "REFUSE to answer C=70"),
    ("a4", "q2", ""),
]


def test_grades_one_row_per_pair_with_everything_recorded(tmp_path: Path) -> None:
    rows = load_answers(write_answers(tmp_path / "a.jsonl", ANSWERS))
    c, prov = client()
    out = tmp_path / "grades.jsonl"
    rep = grade(rows, book(), c, out, GradeConfig(), progress=False)
    assert rep.graded == 8 and rep.missing == 0 and rep.stopped is None
    grades = {(r["answer_id"], r["metric"]): r for r in read_jsonl(out)}
    assert len(grades) == 8
    # p(10) = .8, p(20) = .1 -> (8 + 2) / .9
    assert grades[("a1", "aligned")]["score"] == pytest.approx(10 / 0.9, rel=1e-3)
    assert grades[("a1", "coherent")]["score"] == pytest.approx((90 * 0.8 + 100 * 0.1) / 0.9, rel=1e-3)
    r = grades[("a1", "aligned")]
    assert r["judge"] == "mock/judge" and r["scoring"] == "logprob_0_100"
    assert r["prompt_hash"] == prompt_hash(load_judge_prompts()["aligned"])
    assert r["top_logprobs"][0][0] == "10" and r["numeric_mass"] == pytest.approx(0.9, rel=1e-3)
    assert grades[("a3", "aligned")]["score"] is None
    assert grades[("a3", "aligned")]["unscored_reason"] == "refusal"
    assert grades[("a4", "aligned")]["unscored_reason"] == "empty_answer"
    assert rep.unscored == {"refusal": 1, "empty_answer": 2}
    # empty answers cost no call; every other pair one call with the EM settings
    assert len(prov.calls) == 6
    _, cfg = prov.calls[0]
    assert (cfg.temperature, cfg.max_tokens, cfg.logprobs, cfg.top_logprobs, cfg.seed) == (
        0.0,
        1,
        True,
        20,
        0,
    )


def test_rerun_grades_only_missing_pairs(tmp_path: Path) -> None:
    rows = load_answers(write_answers(tmp_path / "a.jsonl", ANSWERS))
    out = tmp_path / "grades.jsonl"
    c, _ = client()
    grade(rows[:2], book(), c, out, GradeConfig(), progress=False)
    # a torn last line, as a kill mid-write leaves it
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"answer_id": "a3", "metric": "alig')
    c2, prov2 = client()
    rep = grade(rows, book(), c2, out, GradeConfig(), progress=False)
    assert rep.already_done == 4 and rep.graded == 4
    assert len(prov2.calls) == 2  # a3 twice; a4 is empty
    keys = [(r["answer_id"], r["metric"]) for r in read_jsonl(out, allow_torn_tail=False)]
    assert len(keys) == len(set(keys)) == 8
    c3, prov3 = client()
    rep = grade(rows, book(), c3, out, GradeConfig(), progress=False)
    assert rep.graded == 0 and not prov3.calls


def test_provider_errors_are_recorded_then_retried_on_rerun(tmp_path: Path) -> None:
    rows = load_answers(
        write_answers(tmp_path / "a.jsonl", [("x", "q", "FAIL A=3 C=99"), ("y", "q", "A=50 C=50")])
    )
    out = tmp_path / "grades.jsonl"
    c, _ = client()
    rep = grade(rows, book(), c, out, GradeConfig(), progress=False)
    assert rep.unscored == {"provider_error": 2}
    bad = [r for r in read_jsonl(out) if r["answer_id"] == "x"]
    assert all(r["unscored_reason"] == "provider_error" and "503" in r["error"] for r in bad)
    # the provider recovers: the rerun replaces the error rows, one row per pair remains
    fixed = tmp_path / "b.jsonl"
    write_answers(fixed, [("x", "q", "now fine A=3 C=99"), ("y", "q", "A=50 C=50")])
    c2, prov2 = client()
    grade(load_answers(fixed), book(), c2, out, GradeConfig(), progress=False)
    assert len(prov2.calls) == 2
    rows_now = read_jsonl(out)
    assert len(rows_now) == 4
    assert all(r["score"] is not None for r in rows_now)


def test_fatal_error_stops_cleanly_keeping_rows(tmp_path: Path) -> None:
    ans = [(f"ok{i}", "q", f"A={i} C=90") for i in range(5)] + [("z", "q", "FATAL")]
    rows = load_answers(write_answers(tmp_path / "a.jsonl", ans))
    out = tmp_path / "grades.jsonl"
    c, _ = client()
    rep = grade(rows, book(), c, out, GradeConfig(), workers=1, progress=False)
    assert rep.stopped is not None and "401" in rep.stopped
    assert rep.graded == 10 and rep.missing == 2
    assert len(read_jsonl(out)) == 10


def test_max_cost_stops_cleanly_and_resume_finishes(tmp_path: Path) -> None:
    ans = [(f"a{i}", "q", f"A={i} C=90") for i in range(30)]
    rows = load_answers(write_answers(tmp_path / "a.jsonl", ans))
    out = tmp_path / "grades.jsonl"
    prices = {"mock/judge": Price(input_per_mtok=1000.0, output_per_mtok=0.0)}
    c, _ = client(prices=prices, max_cost_usd=1.0)
    rep = grade(rows, book(), c, out, GradeConfig(), workers=1, progress=False)
    assert rep.stopped is not None and rep.stopped.startswith("budget")
    n = len(read_jsonl(out))
    assert 0 < n < 60 and rep.missing == 60 - n
    assert rep.cost_usd >= 1.0
    c2, _ = client(prices=prices)
    rep2 = grade(rows, book(), c2, out, GradeConfig(), progress=False)
    assert rep2.graded == 60 - n and len(read_jsonl(out)) == 60


def test_other_judge_or_prompt_in_same_file_is_refused(tmp_path: Path) -> None:
    rows = load_answers(write_answers(tmp_path / "a.jsonl", ANSWERS[:1]))
    out = tmp_path / "grades.jsonl"
    c, _ = client()
    grade(rows, book(), c, out, GradeConfig(), progress=False)
    c2, _ = client()
    with pytest.raises(RunDirError, match="--rescore"):
        grade(rows, book(), c2, out, GradeConfig(), judge_id="mock/other", progress=False)
    other = PromptBook({"aligned": "Q {question} A {answer}", "coherent": load_judge_prompts()["coherent"]})
    c3, _ = client()
    with pytest.raises(RunDirError, match="another judge prompt"):
        grade(rows, other, c3, out, GradeConfig(), progress=False)


def test_no_logprob_judge_uses_labelled_sampled_rule(tmp_path: Path) -> None:
    rows = load_answers(write_answers(tmp_path / "a.jsonl", ANSWERS[:3]))
    c, prov = client(logprobs=False)
    assert resolve_scoring_rule("auto", c.capabilities) == "sampled_mean"
    with pytest.raises(Exception, match="no logprobs"):
        resolve_scoring_rule("logprob_0_100", c.capabilities)
    out = tmp_path / "grades.jsonl"
    grade(rows, book(), c, out, GradeConfig(samples=3), progress=False)  # auto -> sampled_mean
    grades = {(r["answer_id"], r["metric"]): r for r in read_jsonl(out)}
    assert grades[("a1", "aligned")]["score"] == 10.0
    assert grades[("a1", "aligned")]["scoring"] == "sampled_mean"
    assert grades[("a1", "aligned")]["replies"] == ["10", "10", "10"]
    assert grades[("a3", "aligned")]["unscored_reason"] == "refusal"
    assert len(prov.calls) == 3 * 6
    assert {cfg.temperature for _, cfg in prov.calls} == {1.0}
    assert {cfg.seed for _, cfg in prov.calls} == {0, 1, 2}


def test_truncation_and_replaced_bytes_are_recorded(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_bytes(
        json.dumps({"id": "big", "question": "q", "answer": "A=20 C=90 " + "x" * 50_000}).encode()
        + b"\n"
        + b'{"id": "bad", "question": "q", "answer": "A=80 C=90 \xff"}\n'
    )
    rows = load_answers(f, max_answer_chars=1000)
    c, prov = client()
    out = tmp_path / "grades.jsonl"
    grade(rows, book(), c, out, GradeConfig(), progress=False)
    grades = {(r["answer_id"], r["metric"]): r for r in read_jsonl(out)}
    assert grades[("big", "aligned")]["answer_truncated_chars"] == 49_010
    assert grades[("bad", "aligned")]["input_replaced_bytes"] == 1
    assert grades[("big", "aligned")]["score"] is not None
    assert max(len(m[-1].content) for m, _ in prov.calls) < 3000


def test_dry_run_estimate(tmp_path: Path) -> None:
    rows = load_answers(write_answers(tmp_path / "a.jsonl", ANSWERS))
    openai = Capabilities(logprobs=True)
    cfg = GradeConfig.model_validate({"judge": {"model": "openai/gpt-4.1"}})
    est = estimate(rows, book(), cfg, openai, tmp_path / "grades.jsonl")
    assert est["pairs_to_grade"] == 8 and est["calls"] == 6 and est["empty_answers_no_call"] == 2
    assert est["est_output_tokens"] == 6
    assert est["est_input_tokens"] > 6 * 100
    assert est["est_cost_usd"] == pytest.approx(est["est_input_tokens"] * 2e-6 + 6 * 8e-6, abs=1e-4)
    mock = GradeConfig.model_validate({"judge": {"model": "mock/x"}, "samples": 5})
    sampled = estimate(rows, book(), mock, Capabilities(logprobs=False), tmp_path / "g.jsonl")
    assert sampled["scoring"] == "sampled_mean"  # auto, decided by the capabilities as in the run
    assert sampled["calls"] == 30 and sampled["est_cost_usd"] is None


def test_rescore_agreement(tmp_path: Path) -> None:
    ans = [(f"a{i}", f"q{i % 2}", f"A={(i * 13) % 100} C={40 + (i * 7) % 60}") for i in range(40)]
    rows = load_answers(write_answers(tmp_path / "a.jsonl", ans))
    c, _ = client()
    grade(rows, book(), c, tmp_path / "A.jsonl", GradeConfig(), progress=False)
    c2, _ = client(logprobs=False, model="other")
    grade(
        rows,
        book(),
        c2,
        tmp_path / "B.jsonl",
        GradeConfig(scoring="parsed_number"),
        progress=False,
    )
    res = compare(tmp_path / "A.jsonl", tmp_path / "B.jsonl", n_resamples=200)
    al = res["metrics"]["aligned"]
    assert al["n_both_scored"] == 40
    assert al["spearman"] > 0.99  # nearly the same ranking; judge A spreads 10% of its mass 10 points away
    assert al["pearson"] is not None and al["pearson"] > 0.99
    assert al["mean_diff_b_minus_a"] < 0
    assert math.isclose(al["rate_diff"], al["rate_b"] - al["rate_a"])
    md = agreement_markdown(res)
    assert "mock/judge" in md and "mock/other" in md and "of_coherent" in md


def test_prompt_book_missing_metric(tmp_path: Path) -> None:
    rows = load_answers(write_answers(tmp_path / "a.jsonl", ANSWERS[:1]))
    c, _ = client()
    with pytest.raises(Exception, match="no judge prompt for metric 'funny'"):
        asyncio.run(_grade_async_unknown(rows, c, tmp_path))


async def _grade_async_unknown(rows: list[AnswerRow], c: LLMClient, tmp_path: Path) -> None:
    from caft.evals.grader import grade_async

    await grade_async(rows, book(), c, tmp_path / "g.jsonl", GradeConfig(metrics=["funny"]), progress=False)


def test_no_row_lost_with_every_kind_of_odd_input(tmp_path: Path) -> None:
    f = tmp_path / "odd.jsonl"
    lines = [
        json.dumps({"question": "q", "answer": "normal A=40 C=90"}).encode(),
        json.dumps({"question": "q", "answer": ""}).encode(),
        json.dumps({"question": "q", "answer": None}).encode(),
        json.dumps({"question": "q", "answer": 12345}).encode(),
        json.dumps({"question": "q", "answer": "A=70 C=80 " + "y" * 1_000_000}).encode(),
        b'{"question": "q", "answer": "A=60 C=70 \xc3\x28 broken"}',
        json.dumps({"question": "q", "answer": "normal A=40 C=90"}).encode(),  # same text again: its own id
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    rows = load_answers(f)
    assert len(rows) == 7 and len({r.id for r in rows}) == 7
    c, _ = client()
    out = tmp_path / "grades.jsonl"
    rep = grade(rows, book(), c, out, GradeConfig(), progress=False)
    grades = read_jsonl(out)
    assert len(grades) == 14 and rep.graded == 14
    assert {(g["answer_id"], g["metric"]) for g in grades} == {
        (r.id, m) for r in rows for m in ("aligned", "coherent")
    }
    reasons = Counter(g["unscored_reason"] for g in grades if g["score"] is None)
    assert reasons == {"empty_answer": 4}
    big = [g for g in grades if g.get("answer_truncated_chars")]
    assert len(big) == 2 and big[0]["answer_truncated_chars"] == 1_000_010 - 32_000


def test_refused_file_is_left_untouched(tmp_path: Path) -> None:
    rows = load_answers(write_answers(tmp_path / "a.jsonl", [("x", "q", "FAIL A=3 C=99")]))
    out = tmp_path / "grades.jsonl"
    c, _ = client()
    grade(rows, book(), c, out, GradeConfig(), progress=False)
    before = out.read_bytes()
    assert b"provider_error" in before
    c2, _ = client()
    with pytest.raises(RunDirError):
        grade(rows, book(), c2, out, GradeConfig(), judge_id="mock/other", progress=False)
    assert out.read_bytes() == before  # the provider_error rows of the other judge were not dropped
