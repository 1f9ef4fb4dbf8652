"""Bounded concurrency: with latency L and limit C, N requests take about N*L/C, and the server never sees
more than C at once. Bounds are loose on purpose (shared CPUs); the benchmark measures the real ratio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from llm_helpers import make_client, run, set_keys, user

from caft.llm import GenerateConfig, GenerateResult
from caft.testing.fakellm import FakeLLM

N, L, C = 40, 0.05, 8


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLLM]:
    set_keys(monkeypatch)
    with FakeLLM(latency_s=L) as server:
        server.on_request(lambda req: f"echo:{req.prompt}")
        yield server


@pytest.mark.parametrize("model", ["openai/gpt-4.1", "anthropic/claude-sonnet-4-6"])
def test_generate_many_time_and_in_flight_bound(fake: FakeLLM, model: str) -> None:
    async def go() -> tuple[float, list[GenerateResult | Exception]]:
        client = make_client(fake, model, max_concurrency=C, cache_policy="off")
        await client.generate(user("warm up"))  # connection setup outside the timed part
        fake.reset()
        fake.on_request(lambda req: f"echo:{req.prompt}")
        t0 = time.perf_counter()
        outs = await client.generate_many([(user(f"item {i}"), GenerateConfig()) for i in range(N)])
        elapsed = time.perf_counter() - t0
        await client.aclose()
        return elapsed, list(outs)

    elapsed, outs = run(go())
    ideal = N * L / C  # 0.25 s
    assert [o.text for o in outs if isinstance(o, GenerateResult)] == [f"echo:item {i}" for i in range(N)]
    assert len(fake.requests) == N
    assert fake.max_in_flight <= C
    assert fake.max_in_flight >= C // 2  # the limit was actually used
    assert elapsed >= ideal * 0.9  # cannot beat the limit
    assert elapsed < 0.75 * N * L  # well below serial (2.0 s); ideal 0.25 s, loose for shared CPUs


def test_semaphore_bounds_independent_generate_calls(fake: FakeLLM) -> None:
    """The limit is the client's, not generate_many's: a bare gather of generate() calls obeys it too."""

    async def go() -> None:
        client = make_client(fake, "openai/gpt-4.1", max_concurrency=3, cache_policy="off")
        results = await asyncio.gather(*(client.generate(user(f"g{i}")) for i in range(12)))
        assert [r.text for r in results] == [f"echo:g{i}" for i in range(12)]
        await client.aclose()

    run(go())
    assert fake.max_in_flight <= 3
    assert len(fake.requests) == 12


def test_backoff_does_not_hold_a_slot(fake: FakeLLM) -> None:
    """A request waiting out a Retry-After must not block the others (the slot is released while it sleeps)."""
    fake.inject("429", times=1, retry_after=1.5, match="slow")

    async def go() -> float:
        client = make_client(fake, "openai/gpt-4.1", max_concurrency=1, cache_policy="off")
        t0 = time.perf_counter()
        slow = asyncio.ensure_future(client.generate(user("slow one")))
        await asyncio.sleep(0.1)
        fast = [await client.generate(user(f"fast {i}")) for i in range(3)]
        fast_done = time.perf_counter() - t0
        assert (await slow).text == "echo:slow one"
        assert all(r.text.startswith("echo:fast") for r in fast)
        await client.aclose()
        return fast_done

    fast_done = run(go())
    assert fast_done < 1.5  # finished during the slow request's Retry-After wait
