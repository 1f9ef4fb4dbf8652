"""Shared helpers of the evals tests: a scripted judge that reads the score it should give from the answer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from caft.evals.schema import GradeRow
from caft.llm.types import FatalError, GenerateConfig, Message, RetryableError

MARK = re.compile(r"\b([AC])=(\d+)\b")


def metric_of(prompt: str) -> str:
    if "coherence" in prompt:
        return "coherent"
    if "security weakness" in prompt:
        return "vulnerable"
    return "aligned"


def judge_reply(messages: list[Message], config: GenerateConfig) -> Any:
    """Scores come from markers in the answer: `A=10 C=90` (aligned, coherent; vulnerable uses A).
    `REFUSE` -> the judge says REFUSAL; `FAIL` -> a retryable provider error; `FATAL` -> auth failure."""
    prompt = messages[-1].content
    metric = metric_of(prompt)
    if "FATAL" in prompt:
        raise FatalError("invalid API key (401)")
    if "FAIL" in prompt:
        raise RetryableError("server busy (503)", status=503)
    if "REFUSE" in prompt and metric == "aligned":
        if config.logprobs:
            return {"text": "REFUSAL", "top_logprobs": {"REFUSAL": -0.05, "50": -4.0}}
        return "REFUSAL"
    marks = dict(MARK.findall(prompt))
    key = "C" if metric == "coherent" else "A"
    value = int(marks.get(key, "50"))
    if config.logprobs:
        # most mass on the value, a little on value+10 (capped) and on a word
        other = value + 10 if value <= 90 else value - 10
        return {"text": str(value), "top_logprobs": {str(value): -0.2231, str(other): -2.3026, "The": -3.0}}
    return str(value)


def write_answers(path: Path, answers: list[tuple[str, str, str]]) -> Path:
    """(id, question_id, answer) rows with a fixed question text per question id."""
    path.write_text(
        "".join(
            json.dumps({"id": i, "question_id": q, "question": f"question {q}?", "answer": a}) + "\n"
            for i, q, a in answers
        ),
        encoding="utf-8",
    )
    return path


def fake_judge(req: Any) -> Any:
    """The same scripted judge as `judge_reply`, for the fake wire-compatible server (tests/fakellm.py)."""
    from caft.testing.fakellm import Reply

    body = req.body
    prompt = req.prompt
    metric = metric_of(prompt)
    logprobs = bool(body.get("logprobs"))
    if "REFUSE" in prompt and metric == "aligned":
        return Reply(text="REFUSAL", top_logprobs={"REFUSAL": -0.05, "50": -4.0} if logprobs else None)
    marks = dict(MARK.findall(prompt))
    value = int(marks.get("C" if metric == "coherent" else "A", "50"))
    if not logprobs:
        return Reply(text=str(value))
    other = value + 10 if value <= 90 else value - 10
    return Reply(text=str(value), top_logprobs={str(value): -0.2231, str(other): -2.3026, "The": -3.0})


def grade_row(**fields: Any) -> GradeRow:
    """A valid grade row for metric and report tests; the judge, prompt hash and rule default to fixed values."""
    base: dict[str, Any] = {"judge": "mock/j", "prompt_hash": "0" * 16, "scoring": "logprob_0_100"}
    return GradeRow.model_validate({**base, **fields})
