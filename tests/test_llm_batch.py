"""Provider batch APIs (caft.llm.batch) through the real SDKs against the fake server's batch endpoints:
same bodies and results as single calls, the cache, partial failures and expiry retried one by one, batch
prices, and a kill -9 of a real subprocess mid-poll followed by a resume that submits nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_helpers import ANTHROPIC_KEY, OPENAI_KEY, make_client, run, set_keys, user
from pydantic import BaseModel

from caft.errors import ConfigError
from caft.llm import GenerateConfig, GenerateResult, LLMClient, LLMError, MockProvider, Price, RetryableError
from caft.llm.batch import STATE_FILE, BatchPendingError, generate_all, run_batch
from caft.llm.client import Request
from caft.llm.prices import BATCH_DISCOUNT, load_prices
from caft.testing.fakellm import FakeLLM, RecordedRequest, Reply

MODELS = ["openai/gpt-4.1", "anthropic/claude-sonnet-4-6"]
FAST = {"poll_initial_s": 0.05, "poll_max_s": 0.2}


class Score(BaseModel):
    score: int
    reason: str


def answer(req: RecordedRequest) -> Reply:
    prompt = req.prompt
    if "structured" in prompt:
        return Reply(json={"score": len(prompt), "reason": "length"}, input_tokens=100, output_tokens=10)
    if "rate" in prompt:
        return Reply(
            text="7", top_logprobs={"7": -0.1, "8": -2.5, "6": -3.0}, input_tokens=100, output_tokens=1
        )
    return Reply(text=f"echo {prompt}", input_tokens=100, output_tokens=20)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> FakeLLM:
    server.reset()
    server.on_request(answer)
    set_keys(monkeypatch)
    return server


def requests_for(model: str, n: int = 6) -> list[Request]:
    reqs: list[Request] = [(user(f"question {i}"), GenerateConfig(max_tokens=50 + i)) for i in range(n)]
    reqs.append((user("structured please"), GenerateConfig(response_model=Score, temperature=0.0)))
    reqs.append((user("sampled one"), GenerateConfig(temperature=0.7, top_p=0.9, stop=["\n\n"])))
    if model.startswith("openai/"):
        reqs.append((user("rate this 0-100"), GenerateConfig(logprobs=True, top_logprobs=3, seed=1)))
    return reqs


def same_result(a: GenerateResult, b: GenerateResult) -> None:
    assert a.text == b.text and a.parsed == b.parsed and a.finish_reason == b.finish_reason
    assert a.logprobs == b.logprobs and a.tool_calls == b.tool_calls
    assert (a.usage.input_tokens, a.usage.output_tokens) == (b.usage.input_tokens, b.usage.output_tokens)


@pytest.mark.parametrize("model", MODELS)
def test_batch_equals_the_single_call_path(fake: FakeLLM, model: str, tmp_path: Path) -> None:
    reqs = requests_for(model)

    async def go() -> tuple[list[object], list[object]]:
        async with make_client(fake, model) as single:
            one = await single.generate_many(reqs)
        async with make_client(fake, model) as batched:
            many = await run_batch(batched, reqs, tmp_path / "state", **FAST)
        return list(one), list(many)

    one, many = run(go())
    assert len(many) == len(reqs)
    for a, b in zip(one, many, strict=True):
        assert isinstance(a, GenerateResult) and isinstance(b, GenerateResult)
        same_result(a, b)
    structured = many[6]
    assert isinstance(structured, GenerateResult) and isinstance(structured.parsed, Score)

    # every batched body is exactly the body the single call sent (the single calls ran concurrently)
    def bodies(rs: list[RecordedRequest]) -> list[str]:
        return sorted(json.dumps(r.body, sort_keys=True) for r in rs)

    assert bodies(fake.batch_requests) == bodies(fake.requests)
    assert fake.batches_created == 1 and len(fake.requests) == len(reqs)
    state = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    (sub,) = state["submissions"]
    assert sub["state"] == "fetched" and sub["batch_id"] and len(sub["custom_ids"]) == len(reqs)


@pytest.mark.parametrize("model", MODELS)
def test_cache_is_shared_with_single_calls(fake: FakeLLM, model: str, tmp_path: Path) -> None:
    reqs = [(user(f"q{i}"), GenerateConfig()) for i in range(5)]
    cache = tmp_path / "cache.sqlite"

    async def go() -> None:
        async with make_client(fake, model, cache_path=cache) as c:
            await c.generate(*reqs[0])  # a single call fills the cache: the batch skips it
            res = await run_batch(c, reqs, tmp_path / "s1", **FAST)
            assert [r.text for r in res if isinstance(r, GenerateResult)] == [f"echo q{i}" for i in range(5)]
            assert res[0].cached and not any(r.cached for r in res[1:] if isinstance(r, GenerateResult))
            assert len(fake.batch_requests) == 4
        fake.reset()
        fake.on_request(answer)
        async with make_client(fake, model, cache_path=cache) as c:
            again = await c.generate_many(reqs)  # the batch's replies are under the single-call keys
            assert all(isinstance(r, GenerateResult) and r.cached for r in again)
            res2 = await run_batch(c, reqs, tmp_path / "s2", **FAST)
            assert all(isinstance(r, GenerateResult) and r.cached for r in res2)
        assert not fake.requests and not fake.batch_requests

    run(go())


@pytest.mark.parametrize("model", MODELS)
def test_partial_failures_and_expiry_are_retried_one_by_one(
    fake: FakeLLM, model: str, tmp_path: Path
) -> None:
    fake.batch.fail = "q2"
    fake.batch.expire = "q4"
    reqs = [(user(f"q{i}"), GenerateConfig()) for i in range(6)]

    async def go() -> list[object]:
        async with make_client(fake, model) as c:
            res = await run_batch(c, reqs, tmp_path / "s", **FAST)
            assert c.usage.calls == 6
            return list(res)

    res = run(go())
    assert [r.text for r in res if isinstance(r, GenerateResult)] == [f"echo q{i}" for i in range(6)]
    assert sorted(r.prompt for r in fake.requests) == ["q2", "q4"]  # only those went the single-call way
    assert len(fake.batch_requests) == 6 and fake.batches_created == 1


def test_openai_batch_expires_and_failed_items_can_be_left_failed(fake: FakeLLM, tmp_path: Path) -> None:
    fake.batch.expire = "q1"
    reqs = [(user(f"q{i}"), GenerateConfig()) for i in range(3)]

    async def go() -> list[object]:
        async with make_client(fake, "openai/gpt-4.1") as c:
            seen: list[str] = []
            res = await run_batch(
                c,
                reqs,
                tmp_path / "s",
                retry_failed=False,
                on_status=lambda p: seen.extend(s.status for s in p.status.values()),
                **FAST,
            )
            assert seen[-1] == "expired"
            return list(res)

    res = run(go())
    assert isinstance(res[1], RetryableError) and "expired" in str(res[1])
    assert isinstance(res[0], GenerateResult) and isinstance(res[2], GenerateResult) and not fake.requests


@pytest.mark.parametrize("model", MODELS)
def test_cost_is_the_batch_price(fake: FakeLLM, model: str, tmp_path: Path) -> None:
    price = Price(input_per_mtok=2.0, output_per_mtok=8.0)
    prices = {model: price}
    fake.batch.fail = "q0"  # retried singly: standard price
    reqs = [(user(f"q{i}"), GenerateConfig()) for i in range(4)]

    async def go() -> tuple[float, float]:
        async with make_client(fake, model, prices=prices) as c:
            res = await run_batch(c, reqs, tmp_path / "s", **FAST)
            assert all(isinstance(r, GenerateResult) for r in res)
            per = [r.usage.cost_usd for r in res if isinstance(r, GenerateResult)]
            assert per[0] == pytest.approx(price.cost(100, 20))
            assert per[1:] == [pytest.approx(price.cost(100, 20) * BATCH_DISCOUNT)] * 3
            return c.usage.cost_usd, sum(p or 0.0 for p in per)

    total, summed = run(go())
    assert total == pytest.approx(summed)
    assert total == pytest.approx(price.cost(100, 20) + 3 * price.batch().cost(100, 20))


def test_price_table_batch_fields(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(
        "x/cheap: {input_per_mtok: 1.0, output_per_mtok: 4.0, batch_input_per_mtok: 0.3, batch_output_per_mtok: 1.0}\n"
    )
    table = load_prices(f)
    assert table["x/cheap"].batch() == Price(0.3, 1.0)
    assert table["openai/gpt-4.1"].batch() == Price(1.0, 4.0)  # 50% by default
    f.write_text("x/bad: {input_per_mtok: 1.0, output_per_mtok: 4.0, batch_price: 1}\n")
    with pytest.raises(ConfigError, match="batch_input_per_mtok"):
        load_prices(f)


def test_duplicates_sampled_and_deterministic(fake: FakeLLM, tmp_path: Path) -> None:
    det = (user("same"), GenerateConfig())
    sampled = (user("again"), GenerateConfig(temperature=1.0))
    reqs = [det, det, sampled, sampled, sampled]

    async def go() -> list[object]:
        async with make_client(fake, "openai/gpt-4.1") as c:
            return list(await run_batch(c, reqs, tmp_path / "s", **FAST))

    res = run(go())
    assert len(res) == 5 and all(isinstance(r, GenerateResult) for r in res)
    # identical temperature-0 requests share one item; each sampled copy is its own draw
    assert sorted(r.prompt for r in fake.batch_requests) == ["again", "again", "again", "same"]


def test_pending_batch_resumes_without_resubmitting(fake: FakeLLM, tmp_path: Path) -> None:
    fake.batch.delay_s = 60.0
    reqs = [(user(f"q{i}"), GenerateConfig()) for i in range(3)]

    async def go(max_wait_s: float | None) -> list[LLMError | GenerateResult]:
        async with make_client(fake, "anthropic/claude-sonnet-4-6") as c:
            return await run_batch(c, reqs, tmp_path / "s", max_wait_s=max_wait_s, **FAST)

    with pytest.raises(BatchPendingError, match="rerun with the same state folder"):
        run(go(0.2))
    fake.end_batches()
    res = run(go(None))
    assert [r.text for r in res if isinstance(r, GenerateResult)] == ["echo q0", "echo q1", "echo q2"]
    assert fake.batches_created == 1 and len(fake.batch_requests) == 3
    # a third run replays the fetched results: no request, no money
    res3 = run(go(None))
    assert all(isinstance(r, GenerateResult) and r.cached and r.usage.cost_usd == 0.0 for r in res3)
    assert fake.batches_created == 1 and not fake.requests


def test_lost_openai_batch_id_is_found_by_its_tag(fake: FakeLLM, tmp_path: Path) -> None:
    reqs = [(user(f"q{i}"), GenerateConfig()) for i in range(3)]
    state = tmp_path / "s"

    async def go() -> list[LLMError | GenerateResult]:
        async with make_client(fake, "openai/gpt-4.1") as c:
            return await run_batch(c, reqs, state, **FAST)

    fake.batch.delay_s = 60.0
    with pytest.raises(BatchPendingError):

        async def first() -> None:
            async with make_client(fake, "openai/gpt-4.1") as c:
                await run_batch(c, reqs, state, max_wait_s=0.1, **FAST)

        run(first())
    # as if killed between the provider's create and the state write: the id never reached disk
    data = json.loads((state / STATE_FILE).read_text())
    data["submissions"][0].update(batch_id=None, state="submitting")
    (state / STATE_FILE).write_text(json.dumps(data))
    fake.end_batches()
    res = run(go())
    assert all(isinstance(r, GenerateResult) for r in res)
    assert fake.batches_created == 1 and len(fake.batch_requests) == 3


def test_wrong_state_folder_and_unsupported_provider(fake: FakeLLM, tmp_path: Path) -> None:
    reqs = [(user("q"), GenerateConfig())]

    async def go(model: str) -> None:
        async with make_client(fake, model) as c:
            await run_batch(c, reqs, tmp_path / "s", **FAST)

    run(go("openai/gpt-4.1"))
    with pytest.raises(ConfigError, match="another state folder"):
        run(go("anthropic/claude-sonnet-4-6"))

    async def mock() -> None:
        await run_batch(LLMClient(MockProvider("m", ["x"])), reqs, tmp_path / "m")

    with pytest.raises(ConfigError, match="no batch API"):
        run(mock())


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from caft.llm import GenerateConfig, LLMClient, Message, get_provider
    from caft.llm.batch import run_batch

    async def main() -> None:
        base_url, state, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        client = LLMClient(get_provider("openai/gpt-4.1", base_url=base_url))
        reqs = [([Message(role="user", content=f"q{i}")], GenerateConfig()) for i in range(n)]
        await run_batch(client, reqs, state, poll_initial_s=0.05, poll_max_s=0.1)
        print("FINISHED", flush=True)

    asyncio.run(main())
    """
)


def test_kill_9_mid_poll_then_resume_submits_each_request_once(fake: FakeLLM, tmp_path: Path) -> None:
    n = 20
    state = tmp_path / "state"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    fake.batch.delay_s = 3600.0
    env = {**os.environ, "OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}
    child = subprocess.Popen(
        [sys.executable, str(script), fake.openai_base_url, str(state), str(n)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (state / STATE_FILE).exists():
                subs = json.loads((state / STATE_FILE).read_text())["submissions"]
                if subs and subs[0]["state"] == "running":
                    break
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            time.sleep(0.05)
        time.sleep(0.3)  # a few poll rounds
        assert child.poll() is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert fake.batches_created == 1 and len(fake.batch_requests) == n
    fake.end_batches()

    async def resume() -> list[LLMError | GenerateResult]:
        async with make_client(fake, "openai/gpt-4.1") as c:
            return await run_batch(c, [(user(f"q{i}"), GenerateConfig()) for i in range(n)], state, **FAST)

    res = run(resume())
    assert [r.text for r in res if isinstance(r, GenerateResult)] == [f"echo q{i}" for i in range(n)]
    assert len(fake.batch_requests) / n == 1.0 and fake.batches_created == 1 and not fake.requests


def test_generate_all_batches_when_it_can(fake: FakeLLM, tmp_path: Path) -> None:
    reqs = [(user(f"q{i}"), GenerateConfig()) for i in range(3)]
    seen: list[tuple[int, str]] = []

    def note(i: int, r: LLMError | GenerateResult) -> None:
        seen.append((i, r.text if isinstance(r, GenerateResult) else repr(r)))

    async def go() -> None:
        async with make_client(fake, "openai/gpt-4.1") as c:
            res = await generate_all(c, reqs, batch=True, state_dir=tmp_path / "s", on_result=note, **FAST)
            assert [r.text for r in res if isinstance(r, GenerateResult)] == ["echo q0", "echo q1", "echo q2"]
            with pytest.raises(ConfigError, match="state folder"):
                await generate_all(c, reqs, batch=True)
        mock = LLMClient(MockProvider("m", lambda messages, config: "mocked"))
        res = await generate_all(mock, reqs, batch=True, state_dir=tmp_path / "m")  # no batch API: one by one
        assert [r.text for r in res if isinstance(r, GenerateResult)] == ["mocked"] * 3

    run(go())
    assert seen == [(0, "echo q0"), (1, "echo q1"), (2, "echo q2")]
    assert len(fake.batch_requests) == 3 and not fake.requests
