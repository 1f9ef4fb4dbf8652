"""Each provider against the fake server through the real openai / anthropic SDK clients: plain text,
structured output (with a repair round), logprobs, tool calls, usage numbers, and the wire fields sent."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator

import pytest
from llm_helpers import PROVIDERS, make_client, run, set_keys, user
from pydantic import BaseModel

from caft.llm import (
    CapabilityError,
    FatalError,
    GenerateConfig,
    Message,
    RetryableError,
    StructuredOutputError,
    ToolCall,
    ToolSpec,
    get_provider,
)
from caft.testing.fakellm import FakeLLM, Reply


class Verdict(BaseModel):
    score: int
    reason: str


LOOKUP = ToolSpec(
    name="lookup",
    description="Look a word up.",
    parameters={"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> FakeLLM:
    server.reset()
    server.default = None
    set_keys(monkeypatch)
    return server


@pytest.mark.parametrize("model", PROVIDERS)
def test_plain_text_and_wire_fields(fake: FakeLLM, model: str) -> None:
    fake.add_rule("capital of France", "Paris")

    async def go() -> None:
        client = make_client(fake, model)
        msgs = [
            Message(role="system", content="Be terse."),
            Message(role="user", content="capital of France?"),
        ]
        res = await client.generate(msgs, GenerateConfig(temperature=0.0, max_tokens=5, seed=0, stop=["\n"]))
        assert res.text == "Paris"
        await client.aclose()

    run(go())
    assert len(fake.requests) == 1
    body = fake.requests[0].body
    assert body["temperature"] == 0.0
    if model.startswith("anthropic/"):
        assert fake.requests[0].path == "/v1/messages"
        assert body["system"] == "Be terse."
        assert body["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "capital of France?"}]}
        ]
        assert body["max_tokens"] == 5 and body["stop_sequences"] == ["\n"]
        assert "seed" not in body
    else:
        assert fake.requests[0].path == "/v1/chat/completions"
        assert body["messages"][0] == {"role": "system", "content": "Be terse."}
        assert body["seed"] == 0 and body["stop"] == ["\n"]
        limit = "max_tokens" if model.startswith("openai-compatible/") else "max_completion_tokens"
        assert body[limit] == 5


@pytest.mark.parametrize("model", PROVIDERS)
def test_structured_output_with_repair_round(fake: FakeLLM, model: str) -> None:
    fake.reply_in_order(Reply(json={"score": "high"}), Reply(json={"score": 81, "reason": "on topic"}))

    async def go() -> None:
        client = make_client(fake, model)
        res = await client.generate(user("judge this"), GenerateConfig(response_model=Verdict))
        assert isinstance(res.parsed, Verdict)
        assert res.parsed == Verdict(score=81, reason="on topic")
        await client.aclose()

    run(go())
    assert len(fake.requests) == 2
    first, second = (r.body for r in fake.requests)
    if model.startswith("anthropic/"):
        assert first["tool_choice"] == {"type": "tool", "name": "Verdict"}
        assert first["tools"][0]["input_schema"]["properties"]["score"]["type"] == "integer"
    elif model.startswith("openai/"):
        fmt = first["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"]["additionalProperties"] is False
    else:
        assert first["response_format"] == {"type": "json_object"}
        assert '"score"' in first["messages"][0]["content"]  # schema in the system prompt
    repair_prompt = fake.requests[1].prompt
    assert '{"score": "high"}' in repair_prompt
    assert re.search(r"score: Input should be a valid integer", repair_prompt)
    assert second.get("tool_choice", first.get("tool_choice")) == first.get("tool_choice")


@pytest.mark.parametrize("model", PROVIDERS)
def test_structured_output_fails_typed_after_one_repair(fake: FakeLLM, model: str) -> None:
    fake.reply_in_order(Reply(json={"score": 1}), Reply(json={"reason": "no score"}), Reply(json={"x": 0}))

    async def go() -> None:
        client = make_client(fake, model)
        with pytest.raises(StructuredOutputError, match="after one repair round") as info:
            await client.generate(user("judge this"), GenerateConfig(response_model=Verdict))
        assert json.loads(info.value.raw_text) == {"reason": "no score"}
        assert info.value.result is not None and info.value.result.raw_response
        await client.aclose()

    run(go())
    assert len(fake.requests) == 2


@pytest.mark.parametrize("model", PROVIDERS)
def test_logprobs_top20_or_capability_error(fake: FakeLLM, model: str) -> None:
    table = {str(k): -0.05 * (k + 1) for k in range(25)}
    fake.add_rule("rate it", Reply(text="0", top_logprobs=table))

    async def go() -> None:
        client = make_client(fake, model)
        cfg = GenerateConfig(max_tokens=1, logprobs=True, top_logprobs=20)
        if model.startswith("anthropic/"):
            assert client.capabilities.logprobs is False
            with pytest.raises(CapabilityError, match="cannot return logprobs"):
                await client.generate(user("rate it"), cfg)
        else:
            assert client.capabilities.logprobs is True
            res = await client.generate(user("rate it"), cfg)
            assert res.logprobs is not None and len(res.logprobs) == 1
            pos = res.logprobs[0]
            assert pos.token == "0" and pos.logprob == pytest.approx(-0.05)
            assert len(pos.top) == 20
            assert [t.token for t in pos.top[:3]] == ["0", "1", "2"]
        await client.aclose()

    run(go())
    if model.startswith("anthropic/"):
        assert fake.requests == []  # refused before any request
    else:
        assert fake.requests[0].body["logprobs"] is True
        assert fake.requests[0].body["top_logprobs"] == 20


@pytest.mark.parametrize("model", PROVIDERS)
def test_tool_calls_round_trip(fake: FakeLLM, model: str) -> None:
    fake.reply_in_order(
        Reply(text="", tool_calls=[{"name": "lookup", "arguments": {"word": "sycophancy"}}]),
        "It means flattery.",
    )

    async def go() -> ToolCall:
        client = make_client(fake, model)
        cfg = GenerateConfig(tools=[LOOKUP], tool_choice="auto")
        msgs = user("what is sycophancy?")
        first = await client.generate(msgs, cfg)
        assert len(first.tool_calls) == 1
        call = first.tool_calls[0]
        assert call.name == "lookup" and call.arguments == {"word": "sycophancy"} and call.parse_error is None
        follow = [
            *msgs,
            Message(role="assistant", content="", tool_calls=[call]),
            Message(role="tool", tool_call_id=call.id, content="excessive flattery"),
        ]
        second = await client.generate(follow, cfg)
        assert second.text == "It means flattery."
        await client.aclose()
        return call

    call = run(go())
    first_body, second_body = (r.body for r in fake.requests)
    if model.startswith("anthropic/"):
        assert first_body["tools"][0]["input_schema"] == LOOKUP.parameters
        assert first_body["tool_choice"] == {"type": "auto"}
        turns = second_body["messages"]
        assert turns[1]["content"][0] == {
            "type": "tool_use",
            "id": call.id,
            "name": "lookup",
            "input": {"word": "sycophancy"},
        }
        assert turns[2] == {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "excessive flattery"}],
        }
    else:
        assert first_body["tools"][0]["function"]["name"] == "lookup"
        assert first_body["tool_choice"] == "auto"
        turns = second_body["messages"]
        assert turns[1]["tool_calls"][0]["function"] == {
            "name": "lookup",
            "arguments": '{"word": "sycophancy"}',
        }
        assert turns[2] == {"role": "tool", "content": "excessive flattery", "tool_call_id": call.id}


def test_malformed_tool_arguments_are_flagged(fake: FakeLLM) -> None:
    fake.reply_in_order(Reply(tool_calls=[{"name": "lookup", "arguments": '{"word": '}]))

    async def go() -> ToolCall:
        client = make_client(fake, "openai/gpt-4.1")
        res = await client.generate(user("x"), GenerateConfig(tools=[LOOKUP]))
        await client.aclose()
        return res.tool_calls[0]

    call = run(go())
    assert call.arguments == {}
    assert call.parse_error is not None and "not valid JSON" in call.parse_error


@pytest.mark.parametrize("model", PROVIDERS)
def test_usage_numbers_and_cost(fake: FakeLLM, model: str) -> None:
    fake.add_rule("count", Reply(text="done", input_tokens=1200, output_tokens=300))

    async def go() -> None:
        client = make_client(fake, model, stage="grade")
        res = await client.generate(user("count me"))
        assert (res.usage.input_tokens, res.usage.output_tokens) == (1200, 300)
        expected = {
            "openai/gpt-4.1": 1200 * 2.0e-6 + 300 * 8.0e-6,
            "anthropic/claude-sonnet-4-6": 1200 * 3.0e-6 + 300 * 15.0e-6,
        }.get(model)
        if expected is None:  # a local model: tokens only
            assert res.usage.cost_usd is None
            assert client.usage.unpriced_calls == 1
        else:
            assert res.usage.cost_usd == pytest.approx(expected)
            assert client.usage.cost_usd == pytest.approx(expected)
            assert client.usage.by_stage["grade"].cost_usd == pytest.approx(expected)
        assert client.usage.input_tokens == 1200 and client.usage.output_tokens == 300
        await client.aclose()

    run(go())


def test_sdk_retries_are_disabled(fake: FakeLLM) -> None:
    """With our max_retries=0 the server sees exactly one request: the SDK adds none of its own."""
    for model in PROVIDERS:
        fake.reset()
        fake.default = "ok"
        fake.inject("500", times=3)

        async def go(model: str = model) -> None:
            client = make_client(fake, model, max_retries=0)
            with pytest.raises(RetryableError, match="HTTP 500"):
                await client.generate(user("x"))
            await client.aclose()

        run(go())
        assert len(fake.requests) == 1, model


def test_missing_key_and_missing_sdk(fake: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(FatalError, match="OPENAI_API_KEY is not set"):
        get_provider("openai/gpt-4.1")
    with pytest.raises(FatalError, match="MY_KEY is not set"):
        get_provider("anthropic/claude-sonnet-4-6", api_key_env="MY_KEY")
    with pytest.raises(FatalError, match="needs a base_url"):
        get_provider("openai-compatible/qwen")
    monkeypatch.setitem(sys.modules, "anthropic", None)  # import anthropic -> ImportError
    with pytest.raises(FatalError, match="pip install anthropic"):
        get_provider("anthropic/claude-sonnet-4-6")


def test_compatible_server_without_key_and_schema_prompt_mode(
    fake: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAFT_JUDGE_API_KEY")
    fake.reply_in_order('```json\n{"score": 5, "reason": "fenced"}\n```')

    async def go() -> None:
        provider = get_provider("openai-compatible/llama", base_url=fake.openai_base_url, structured="prompt")
        from caft.llm import LLMClient

        client = LLMClient(provider)
        res = await client.generate(
            [Message(role="system", content="You grade."), *user("grade")],
            GenerateConfig(response_model=Verdict),
        )
        assert res.parsed == Verdict(score=5, reason="fenced")
        await client.aclose()

    run(go())
    body = fake.requests[0].body
    assert "response_format" not in body
    assert body["messages"][0]["content"].startswith("You grade.")
    assert "JSON schema" in body["messages"][0]["content"]


def test_openai_refusal_is_flagged(fake: FakeLLM) -> None:
    fake.reply_in_order(Reply(refusal="I can't help with that."))

    async def go() -> None:
        client = make_client(fake, "openai/gpt-4.1")
        res = await client.generate(user("x"))
        assert res.text == "" and res.finish_reason == "refusal"
        assert res.raw_response["choices"][0]["message"]["refusal"] == "I can't help with that."
        await client.aclose()

    run(go())
