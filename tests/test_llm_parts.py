"""The LLM layer's parts on their own: strict schemas, the schema-in-prompt fallback, the price table, the
retry policy and the usage ledger."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from llm_helpers import run, user
from pydantic import BaseModel

from caft.errors import ConfigError
from caft.llm import GenerateResult, LLMClient, Message, MockProvider, RetryableError, Usage, load_prices
from caft.llm.accounting import UsageLedger
from caft.llm.prices import Price, find_price
from caft.llm.retry import RetriesStoppedError, RetryPolicy
from caft.llm.structured import extract_json_text, strict_json_schema, validate, with_schema_instructions


class Inner(BaseModel):
    label: str
    weight: float = 1.0


class Outer(BaseModel):
    default: int = 3  # a field literally named "default" must survive
    items: list[Inner]
    note: str | None = None


class FreeForm(BaseModel):
    tags: dict[str, Any]


def test_strict_schema_closes_every_object_and_keeps_fields() -> None:
    schema = strict_json_schema(Outer)
    assert schema is not None
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["default", "items", "note"]
    assert "default" in schema["properties"]  # the field, not the keyword
    assert "default" not in schema["properties"]["default"]  # the keyword is gone
    inner = schema["$defs"]["Inner"]
    assert inner["additionalProperties"] is False and inner["required"] == ["label", "weight"]
    assert strict_json_schema(FreeForm) is None  # free-form mappings cannot be strict


def test_validation_and_fence_stripping() -> None:
    parsed, err = validate(Inner, '```json\n{"label": "a"}\n```')
    assert isinstance(parsed, Inner) and parsed.label == "a" and err is None
    parsed, err = validate(Inner, '{"weight": "heavy"}')
    assert parsed is None and err is not None
    assert "label: Field required" in err and "weight: Input should be a valid number" in err
    assert extract_json_text("  {}  ") == "{}"


def test_schema_instructions_join_the_system_prompt() -> None:
    with_sys = with_schema_instructions([Message(role="system", content="Judge."), *user("x")], Inner)
    assert len(with_sys) == 2 and with_sys[0].content.startswith("Judge.\n\n")
    assert '"label"' in with_sys[0].content
    without = with_schema_instructions(user("x"), Inner)
    assert [m.role for m in without] == ["system", "user"]


def test_price_lookup_and_overrides(tmp_path: Path) -> None:
    table = load_prices()
    gpt = find_price(table, "openai", "gpt-4.1")
    assert gpt is not None and gpt.cost(1_000_000, 1_000_000) == pytest.approx(10.0)
    dated = find_price(table, "anthropic", "claude-sonnet-4-5-20250929")
    assert dated is not None and dated.input_per_mtok == 3.0
    assert find_price(table, "openai", "gpt-4.1-mini-2025-04-14") == find_price(
        table, "openai", "gpt-4.1-mini"
    )
    assert find_price(table, "openai-compatible", "Qwen/Qwen2.5-7B-Instruct") is None
    override = tmp_path / "prices.yaml"
    override.write_text(
        "openai/gpt-4.1: {input_per_mtok: 1.0, output_per_mtok: 1.0}\nmy-local: {input_per_mtok: 0, output_per_mtok: 0}\n"
    )
    table2 = load_prices(override)
    assert table2["openai/gpt-4.1"].input_per_mtok == 1.0
    assert find_price(table2, "openai-compatible", "my-local") is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text("openai/gpt-4.1: {input: 1}\n")
    with pytest.raises(ConfigError, match="input_per_mtok"):
        load_prices(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_prices(tmp_path / "missing.yaml")


def test_unknown_model_counts_tokens_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    class Unpriced(MockProvider):
        name = "openai-compatible"  # not "mock", so the warning applies

    async def go() -> LLMClient:
        client = LLMClient(Unpriced("never-priced-model-xyz", replies=["a b c"] * 3))
        for _ in range(3):
            res = await client.generate(user("q"))
            assert res.usage.cost_usd is None
        return client

    with caplog.at_level(logging.WARNING, logger="caft.llm.accounting"):
        client = run(go())
    warnings = [r for r in caplog.records if "never-priced-model-xyz" in r.getMessage()]
    assert len(warnings) == 1
    u = client.usage
    assert (u.calls, u.unpriced_calls, u.output_tokens, u.cost_usd) == (3, 3, 9, 0.0)


def test_retry_policy_on_its_own_honours_retry_after_cap_and_gives_up() -> None:
    policy = RetryPolicy(2, backoff_initial_s=0.0, backoff_max_s=0.0, max_retry_after_s=0.01)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 2:
            raise RetryableError("429", retry_after=3600.0)  # cut to 0.01 s, or the test hangs
        return "ok"

    assert run(policy.retry(flaky, RetryableError("first", retry_after=3600.0), "m")) == ("ok", 3)

    async def always() -> str:
        raise RetryableError("503", status=503)

    with pytest.raises(RetryableError, match=r"m: gave up after 3 attempt\(s\)") as info:
        run(policy.retry(always, RetryableError("first"), "m"))
    assert info.value.status == 503
    policy.stop()
    with pytest.raises(RetriesStoppedError, match="not retried after 1 failed attempt"):
        run(policy.retry(always, RetryableError("first"), "m"))


def test_usage_ledger_counts_run_and_stage_totals() -> None:
    ledger = UsageLedger("m", Price(input_per_mtok=1.0, output_per_mtok=2.0), warn_unpriced=False)
    result = GenerateResult(text="x", usage=Usage(input_tokens=1_000_000, output_tokens=500_000))
    ledger.add_call(result, "judge")
    ledger.add_cached("judge")
    ledger.add_failure("grade")
    assert result.usage.cost_usd == pytest.approx(2.0)
    t = ledger.totals
    assert (t.calls, t.cached_calls, t.failed_calls, t.cost_usd) == (1, 1, 1, pytest.approx(2.0))
    assert (t.by_stage["judge"].calls, t.by_stage["grade"].failed_calls) == (1, 1)
    t.calls = 99  # a snapshot: the ledger is not changed through it
    assert ledger.totals.calls == 1
