"""A scripted grading judge that reads the score it should give from the answer, for the evals tests and
the grading benchmarks: `judge_reply` for `MockProvider`, `fake_judge` for the fake wire server."""

from __future__ import annotations

import re
from typing import Any

from caft.llm.types import FatalError, GenerateConfig, Message, RetryableError
from caft.testing.fakellm import Reply

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


def fake_judge(req: Any) -> Any:
    """The same scripted judge as `judge_reply`, for the fake wire-compatible server (`FakeLLM`)."""
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
