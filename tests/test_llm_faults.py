"""Every injected fault, through the real SDKs: retried and recovered, or a clear error after the cap. The
server's request count must match the retry policy, and nothing from a failed call may be cached."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_helpers import make_client, run, set_keys, user

from caft.llm import FatalError, GenerateConfig, GenerateResult, ResponseCache, RetryableError
from caft.rundir import read_jsonl
from caft.testing.fakellm import FakeLLM, FaultKind

MODELS = ["openai/gpt-4.1", "anthropic/claude-sonnet-4-6"]
TRANSIENT: list[FaultKind] = ["429", "500", "503", "hang", "malformed", "truncated"]
TIMEOUT_S = 0.3  # the "hang" fault holds the reply past this


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> FakeLLM:
    server.reset()
    server.default = "fine"
    set_keys(monkeypatch)
    return server


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", TRANSIENT)
def test_transient_fault_is_retried_and_recovers(
    fake: FakeLLM, tmp_path: Path, model: str, kind: FaultKind
) -> None:
    fake.inject(kind, times=2, retry_after=0.05 if kind == "429" else None)

    async def go() -> GenerateResult:
        client = make_client(
            fake, model, max_retries=3, timeout_s=TIMEOUT_S, cache_path=tmp_path / "c.sqlite"
        )
        res = await client.generate(user("q"))
        assert client.requests_sent == 3
        await client.aclose()
        return res

    res = run(go())
    assert res.text == "fine"
    assert len(fake.requests) == 3  # two faults + the success: exactly the policy, no SDK retries
    cache = ResponseCache(tmp_path / "c.sqlite")
    assert len(cache) == 1
    cache.close()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", TRANSIENT)
def test_transient_fault_fails_after_cap_and_caches_nothing(
    fake: FakeLLM, tmp_path: Path, model: str, kind: FaultKind
) -> None:
    fake.inject(kind, times=10, retry_after=0.01 if kind == "429" else None)
    log = tmp_path / "calls.jsonl"

    async def go() -> None:
        client = make_client(
            fake, model, max_retries=2, timeout_s=TIMEOUT_S, cache_path=tmp_path / "c.sqlite", call_log=log
        )
        with pytest.raises(RetryableError, match="gave up after 3 attempt") as info:
            await client.generate(user("q"))
        assert client.usage.failed_calls == 1 and client.usage.calls == 0
        await client.aclose()
        expected = {
            "429": "HTTP 429",
            "500": "HTTP 500",
            "503": "HTTP 503",
            "hang": "timeout|timed out",
            "malformed": "malformed reply",
            "truncated": "connection error|malformed",
        }[kind]
        assert info.match(expected)

    run(go())
    assert len(fake.requests) == 3  # 1 + max_retries
    cache = ResponseCache(tmp_path / "c.sqlite")
    assert len(cache) == 0
    cache.close()
    records = read_jsonl(log)
    assert len(records) == 1 and records[0]["error"]["type"] == "RetryableError"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("kind", "advice"),
    [("400", "request refused"), ("401", "Check the API key"), ("403", "permission"), ("404", "model name")],
)
def test_client_errors_are_fatal_and_never_retried(
    fake: FakeLLM, model: str, kind: FaultKind, advice: str
) -> None:
    fake.inject(kind, times=5)

    async def go() -> None:
        client = make_client(fake, model, max_retries=5)
        with pytest.raises(FatalError, match=advice):
            await client.generate(user("q"))
        await client.aclose()

    run(go())
    assert len(fake.requests) == 1


@pytest.mark.parametrize("model", MODELS)
def test_retry_after_is_honoured(fake: FakeLLM, model: str) -> None:
    fake.inject("429", times=1, retry_after=0.5)

    async def go() -> None:
        client = make_client(fake, model, max_retries=2, backoff_initial_s=0.001, backoff_max_s=0.001)
        assert (await client.generate(user("q"))).text == "fine"
        await client.aclose()

    run(go())
    assert len(fake.requests) == 2
    gap = fake.requests[1].time - fake.requests[0].time
    assert gap >= 0.45  # the server's wait, not the 1 ms backoff


def test_retry_after_is_capped(fake: FakeLLM) -> None:
    fake.inject("429", times=1, retry_after=600)

    async def go() -> None:
        client = make_client(fake, "openai/gpt-4.1", max_retries=1, max_retry_after_s=0.05)
        t0 = time.perf_counter()
        assert (await client.generate(user("q"))).text == "fine"
        assert time.perf_counter() - t0 < 5.0
        await client.aclose()

    run(go())
    assert len(fake.requests) == 2


def test_batch_keeps_going_past_transient_failures(fake: FakeLLM) -> None:
    fake.add_rule("doomed", "never seen")
    fake.inject("503", times=100, match="doomed")

    async def go() -> list[GenerateResult | Exception]:
        client = make_client(fake, "openai/gpt-4.1", max_retries=1, max_concurrency=3)
        reqs = [(user("doomed" if i % 4 == 0 else f"fine {i}"), GenerateConfig()) for i in range(8)]
        outs = await client.generate_many(reqs)
        await client.aclose()
        return list(outs)

    outs = run(go())
    assert [isinstance(o, RetryableError) for o in outs] == [i % 4 == 0 for i in range(8)]
    assert all(o.text == "fine" for o in outs if isinstance(o, GenerateResult))
    assert fake.count("doomed") == 2 * 2  # two doomed requests x (1 + max_retries)
    assert fake.count("fine") == 6


def test_fatal_error_stops_the_batch(fake: FakeLLM) -> None:
    fake.inject("401", times=100)

    async def go() -> None:
        client = make_client(fake, "openai/gpt-4.1", max_retries=3, max_concurrency=2)
        with pytest.raises(FatalError, match="401"):
            await client.generate_many([(user(f"q{i}"), GenerateConfig()) for i in range(50)])
        await client.aclose()

    run(go())
    assert len(fake.requests) <= 2  # one per worker, then the batch stops
