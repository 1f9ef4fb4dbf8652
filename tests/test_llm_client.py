"""LLMClient around the scripted mock provider: ordering, errors, structured output, cache, accounting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

from caft.llm import (
    BudgetExceededError,
    CapabilityError,
    FatalError,
    GenerateConfig,
    GenerateResult,
    JudgeConfig,
    LLMClient,
    Message,
    MockProvider,
    RetryableError,
    ScriptExhaustedError,
    StructuredOutputError,
    get_provider,
)
from caft.llm.mock import MockReply
from caft.llm.prices import Price
from caft.rundir import read_jsonl

T = TypeVar("T")


class Score(BaseModel):
    score: int
    reason: str


def user(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_mock_replies_in_order_then_exhausted() -> None:
    async def go() -> None:
        client = LLMClient(MockProvider("m", replies=["one", "two"]))
        assert (await client.generate(user("a"))).text == "one"
        assert (await client.generate(user("b"))).text == "two"
        with pytest.raises(ScriptExhaustedError, match="ran out of scripted replies"):
            await client.generate(user("c"))
        assert client.usage.calls == 2
        assert client.usage.failed_calls == 1

    run(go())


def test_mock_callable_and_scripted_logprobs() -> None:
    def answer(messages: list[Message], config: GenerateConfig) -> dict[str, object]:
        return {"text": "7", "top_logprobs": {"7": -0.2, "8": -1.9, "x": -5.0}}

    async def go() -> None:
        client = LLMClient(MockProvider("m", replies=answer))
        res = await client.generate(user("rate"), GenerateConfig(logprobs=True))
        assert res.logprobs is not None
        assert [t.token for t in res.logprobs[0].top] == ["7", "8", "x"]
        assert res.logprobs[0].logprob == pytest.approx(-0.2)

    run(go())


def test_capability_error_without_request() -> None:
    async def go() -> None:
        mock = MockProvider("m", replies=["1"], logprobs=False)
        client = LLMClient(mock)
        with pytest.raises(CapabilityError, match="cannot return logprobs"):
            await client.generate(user("x"), GenerateConfig(logprobs=True))
        assert mock.calls == []

    run(go())


def test_generate_many_keeps_order_and_returns_errors() -> None:
    def reply(messages: list[Message], config: GenerateConfig) -> str:
        n = int(messages[0].content)
        if n == 3:
            raise ScriptExhaustedError("no script for 3")
        return f"r{n}"

    async def go() -> None:
        client = LLMClient(MockProvider("m", replies=reply), max_concurrency=4)
        seen: list[int] = []
        outs = await client.generate_many(
            [(user(str(i)), GenerateConfig()) for i in range(10)], on_result=lambda i, r: seen.append(i)
        )
        assert [o.text if isinstance(o, GenerateResult) else "err" for o in outs] == [
            "r0",
            "r1",
            "r2",
            "err",
            "r4",
            "r5",
            "r6",
            "r7",
            "r8",
            "r9",
        ]
        assert isinstance(outs[3], ScriptExhaustedError)
        assert sorted(seen) == list(range(10))

    run(go())


def test_generate_many_raises_fatal() -> None:
    async def go() -> None:
        replies: list[MockReply] = ["ok", FatalError("HTTP 401: bad key"), "ok", "ok"]
        client = LLMClient(MockProvider("m", replies=replies), max_concurrency=1)
        with pytest.raises(FatalError, match="401"):
            await client.generate_many([(user(str(i)), GenerateConfig()) for i in range(4)])

    run(go())


def test_retryable_error_is_retried_then_succeeds() -> None:
    async def go() -> None:
        mock = MockProvider("m", replies=[RetryableError("busy"), RetryableError("busy"), "done"])
        client = LLMClient(mock, max_retries=3, backoff_initial_s=0.01, backoff_max_s=0.02)
        res = await client.generate(user("x"))
        assert res.text == "done"
        assert len(mock.calls) == 3
        assert client.requests_sent == 3
        assert client.usage.calls == 1

    run(go())


def test_retry_cap_gives_up_with_count() -> None:
    async def go() -> None:
        mock = MockProvider("m", replies=[RetryableError("busy")] * 5)
        client = LLMClient(mock, max_retries=2, backoff_initial_s=0.01, backoff_max_s=0.02)
        with pytest.raises(RetryableError, match="gave up after 3 attempt"):
            await client.generate(user("x"))
        assert len(mock.calls) == 3

    run(go())


def test_structured_output_with_repair_round() -> None:
    async def go() -> None:
        mock = MockProvider("m", replies=['{"score": "high"}', {"score": 80, "reason": "clear"}])
        client = LLMClient(mock)
        res = await client.generate(user("judge"), GenerateConfig(response_model=Score))
        assert isinstance(res.parsed, Score)
        assert res.parsed.score == 80
        repair_msgs = mock.calls[1][0]
        assert repair_msgs[-2].role == "assistant" and repair_msgs[-2].content == '{"score": "high"}'
        assert "score" in repair_msgs[-1].content and "did not validate" in repair_msgs[-1].content

    run(go())


def test_structured_output_fails_after_one_repair() -> None:
    async def go() -> None:
        mock = MockProvider("m", replies=["not json", '{"score": 1}', '{"score": 2, "reason": "late"}'])
        client = LLMClient(mock)
        with pytest.raises(StructuredOutputError, match="after one repair round") as info:
            await client.generate(user("judge"), GenerateConfig(response_model=Score))
        assert info.value.raw_text == '{"score": 1}'
        assert len(mock.calls) == 2  # never a third try

    run(go())


def test_cache_hit_costs_nothing(tmp_path: Path) -> None:
    prices = {"mock/m": Price(input_per_mtok=1_000_000.0, output_per_mtok=1_000_000.0)}

    async def go() -> None:
        mock = MockProvider("m", replies=["a", "b", "c"])
        client = LLMClient(mock, cache_path=tmp_path / "c.sqlite", prices=prices)
        first = await client.generate(user("same"))
        again = await client.generate(user("same"))
        sampled1 = await client.generate(user("same"), GenerateConfig(temperature=1.0))
        sampled2 = await client.generate(user("same"), GenerateConfig(temperature=1.0))
        assert (first.text, again.text, sampled1.text, sampled2.text) == ("a", "a", "b", "c")
        assert again.cached and not first.cached
        assert again.usage.cost_usd == 0.0
        u = client.usage
        assert (u.calls, u.cached_calls) == (3, 1)
        assert u.cost_usd == pytest.approx(
            first.usage.cost_usd + sampled1.usage.cost_usd + sampled2.usage.cost_usd
        )
        await client.aclose()

    run(go())


def test_cache_policy_all_and_refresh(tmp_path: Path) -> None:
    async def go() -> None:
        path = tmp_path / "c.sqlite"
        c1 = LLMClient(MockProvider("m", replies=["s1"]), cache_path=path, cache_policy="all")
        assert (await c1.generate(user("q"), GenerateConfig(temperature=1.0))).text == "s1"
        c2 = LLMClient(MockProvider("m", replies=[]), cache_path=path, cache_policy="all")
        assert (await c2.generate(user("q"), GenerateConfig(temperature=1.0))).cached
        c3 = LLMClient(MockProvider("m", replies=["fresh"]), cache_path=path, cache_policy="refresh")
        assert (await c3.generate(user("q"), GenerateConfig(temperature=0.0))).text == "fresh"
        c4 = LLMClient(MockProvider("m", replies=[]), cache_path=path)
        hit = await c4.generate(user("q"), GenerateConfig(temperature=0.0))
        assert hit.cached and hit.text == "fresh"
        for c in (c1, c2, c3, c4):
            await c.aclose()

    run(go())


def test_budget_stops_batch() -> None:
    prices = {"mock/m": Price(input_per_mtok=0.0, output_per_mtok=1_000_000.0)}  # $1 per output token

    async def go() -> None:
        client = LLMClient(
            MockProvider("m", replies=["a b"] * 10), prices=prices, max_cost_usd=3.0, max_concurrency=1
        )
        with pytest.raises(BudgetExceededError, match="budget"):
            await client.generate_many([(user(str(i)), GenerateConfig()) for i in range(10)])
        assert client.usage.calls == 2  # $2, $4 -> stop before the third
        assert client.usage.cost_usd == pytest.approx(4.0)

    run(go())


def test_stage_accounting_and_call_log(tmp_path: Path) -> None:
    cfg = JudgeConfig(model="mock/judge", max_concurrency=2, cache="off")

    async def go() -> None:
        client = LLMClient.from_config(cfg, run_dir=tmp_path, stage="grade", replies=["x y", "z", "w"])
        await client.generate(user("a"))
        await client.generate(user("b c"), stage="agent")
        await client.generate(user("d"), stage="agent")
        with pytest.raises(ScriptExhaustedError):
            await client.generate(user("e"), stage="agent")
        await client.aclose()
        u = client.usage
        assert set(u.by_stage) == {"grade", "agent"}
        assert u.by_stage["grade"].calls == 1 and u.by_stage["grade"].output_tokens == 2
        assert u.by_stage["agent"].calls == 2 and u.by_stage["agent"].failed_calls == 1
        assert u.calls == 3 and u.input_tokens == 1 + 2 + 1

    run(go())
    records = read_jsonl(tmp_path / "llm_calls.jsonl")
    assert [r["stage"] for r in records] == ["grade", "agent", "agent", "agent"]
    assert records[-1]["error"]["type"] == "ScriptExhaustedError"
    assert records[0]["text"] == "x y"
    assert json.dumps(records[0]["request"]).count("a") >= 1


def test_get_provider_errors() -> None:
    from caft.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown provider"):
        get_provider("nope/x")
    with pytest.raises(ConfigError, match="must be"):
        get_provider("gpt-4.1")
    with pytest.raises(ValueError, match="provider"):
        JudgeConfig(model="gpt-4.1")
    assert isinstance(get_provider("mock/a", replies=["r"]), MockProvider)


def test_redact_matches_scrub_obj(monkeypatch: pytest.MonkeyPatch) -> None:
    from caft.env import scrub_obj
    from caft.llm.redact import redact, redact_json

    monkeypatch.setenv("OPENAI_API_KEY", "sk-" + "live-abcdefghijklmnop1234")
    obj = {
        "a": "key " + "sk-" + "live-abcdefghijklmnop1234 here",
        "Authorization": "Bearer x",
        "n": [1, {"api_key": "z", "t": "hf_abcdefghijklmnopqrstuvwxyz"}],
        "ok": "plain",
    }
    assert redact(obj) == scrub_obj(obj)
    assert json.loads(redact_json(obj)) == scrub_obj(obj)
    assert "abcdefghijklmnop1234" not in redact_json(obj)
    plain = {"x": ["y", 1]}
    assert redact(plain) is plain  # nothing to remove: no copy
    monkeypatch.setenv("ANTHROPIC_API_KEY", 'odd"secret\\value123')  # JSON would escape it: fallback path
    odd = {"s": 'has odd"secret\\value123 inside'}
    assert redact(odd) == scrub_obj(odd) == {"s": "has *** inside"}
    assert json.loads(redact_json(odd)) == {"s": "has *** inside"}


def test_request_timeout_is_retryable_and_counted() -> None:
    from caft.llm import Provider

    class Slow(Provider):
        name = "mock"

        def __init__(self) -> None:
            super().__init__("slow")
            self.started = 0

        async def generate(self, messages: list[Message], config: GenerateConfig) -> GenerateResult:
            self.started += 1
            if self.started <= 2:
                await asyncio.sleep(10)
            return GenerateResult(text="late but fine")

    async def go() -> None:
        slow = Slow()
        client = LLMClient(slow, timeout_s=0.05, max_retries=2, backoff_initial_s=0.01, backoff_max_s=0.01)
        res = await client.generate(user("x"))
        assert res.text == "late but fine" and slow.started == 3
        slow.started = 0
        client1 = LLMClient(slow, timeout_s=0.05, max_retries=1, backoff_initial_s=0.01, backoff_max_s=0.01)
        with pytest.raises(RetryableError, match=r"gave up after 2 attempt.*no reply within 0.05 s"):
            await client1.generate(user("y"))

    run(go())


def test_repair_round_is_marked_in_the_call_log(tmp_path: Path) -> None:
    async def go() -> None:
        mock = MockProvider("m", replies=['{"score": 1}', {"score": 1, "reason": "ok"}])
        client = LLMClient(mock, call_log=tmp_path / "calls.jsonl")
        res = await client.generate(user("judge"), GenerateConfig(response_model=Score))
        assert res.parsed == Score(score=1, reason="ok")
        await client.aclose()

    run(go())
    records = read_jsonl(tmp_path / "calls.jsonl")
    assert [r["repair_round"] for r in records] == [False, True]
    assert records[0]["text"] == '{"score": 1}' and records[0]["key"] == records[1]["key"]
