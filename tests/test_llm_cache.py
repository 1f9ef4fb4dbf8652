"""The disk cache: a rerun sends zero requests, concurrent writers do not corrupt it, the key covers every
reply-changing parameter and no credential, and no API key reaches the cache, the call log or the manifest."""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_helpers import ANTHROPIC_KEY, COMPAT_KEY, OPENAI_KEY, PROVIDERS, base_url, run, set_keys, user
from pydantic import BaseModel

from caft.env import build_manifest
from caft.llm import (
    GenerateConfig,
    GenerateResult,
    JudgeConfig,
    LLMClient,
    Message,
    ResponseCache,
    ToolSpec,
    cache_key,
)
from caft.rundir import atomic_write_json, read_jsonl
from caft.testing.fakellm import FakeLLM, Reply


class Verdict(BaseModel):
    score: int


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> FakeLLM:
    server.reset()
    server.default = None
    server.on_request(lambda req: f"answer to {req.prompt}")
    set_keys(monkeypatch)
    return server


def judge(model: str, fake: FakeLLM, **kw: object) -> JudgeConfig:
    api_key_env = "CAFT_JUDGE_API_KEY" if model.startswith("openai-compatible/") else None
    return JudgeConfig.model_validate(
        {"model": model, "base_url": base_url(fake, model), "api_key_env": api_key_env, **kw}
    )


def batch(n: int) -> list[tuple[list[Message], GenerateConfig]]:
    return [(user(f"question {i}"), GenerateConfig(temperature=0.0, max_tokens=8)) for i in range(n)]


@pytest.mark.parametrize("model", PROVIDERS)
def test_rerun_of_a_batch_sends_zero_requests(fake: FakeLLM, tmp_path: Path, model: str) -> None:
    cfg = judge(model, fake, max_concurrency=4)

    async def go() -> tuple[list[str], list[str], float]:
        first = LLMClient.from_config(cfg, run_dir=tmp_path, stage="grade")
        outs1 = await first.generate_many(batch(12))
        await first.aclose()
        second = LLMClient.from_config(cfg, run_dir=tmp_path, stage="grade")
        outs2 = await second.generate_many(batch(12))
        u = second.usage
        assert (u.calls, u.cached_calls, u.input_tokens, u.cost_usd) == (0, 12, 0, 0.0)
        assert all(isinstance(o, GenerateResult) and o.cached for o in outs2)
        await second.aclose()
        texts1 = [o.text for o in outs1 if isinstance(o, GenerateResult)]
        texts2 = [o.text for o in outs2 if isinstance(o, GenerateResult)]
        return texts1, texts2, first.usage.cost_usd

    texts1, texts2, _ = run(go())
    assert len(fake.requests) == 12  # only the first pass reached the server
    assert texts1 == texts2 == [f"answer to question {i}" for i in range(12)]
    log = read_jsonl(tmp_path / "llm_calls.jsonl")
    assert [r["cached"] for r in log] == [False] * 12 + [True] * 12


def test_sampled_requests_cached_only_with_policy_all(fake: FakeLLM, tmp_path: Path) -> None:
    sampled = GenerateConfig(temperature=1.0)

    async def go(policy: str) -> None:
        cfg = judge("openai/gpt-4.1", fake, cache=policy)
        for _ in range(2):
            client = LLMClient.from_config(cfg, run_dir=tmp_path / policy)
            await client.generate(user("tell a story"), sampled)
            await client.aclose()

    run(go("deterministic"))
    assert len(fake.requests) == 2
    run(go("all"))
    assert len(fake.requests) == 3
    run(go("off"))
    assert len(fake.requests) == 5
    assert not (tmp_path / "off" / "llm_cache.sqlite").exists()


def test_structured_result_is_revalidated_from_cache(fake: FakeLLM, tmp_path: Path) -> None:
    fake.add_rule("grade", Reply(json={"score": 9}))
    cfg = judge("anthropic/claude-sonnet-4-6", fake)

    async def go() -> None:
        for expect_cached in (False, True):
            client = LLMClient.from_config(cfg, run_dir=tmp_path)
            res = await client.generate(user("grade it"), GenerateConfig(response_model=Verdict))
            assert res.parsed == Verdict(score=9) and res.cached is expect_cached
            await client.aclose()

    run(go())
    assert len(fake.requests) == 1


def test_cache_key_covers_reply_changing_params_and_never_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    msgs = user("hello")
    base = GenerateConfig()

    def key(
        cfg: GenerateConfig = base,
        messages: list[Message] = msgs,
        model: str = "gpt-4.1",
        url: str | None = None,
    ) -> str:
        return cache_key("openai", model, url, messages, cfg)

    tool = ToolSpec(name="t", description="d", parameters={"type": "object"})
    variants = [
        key(),
        key(GenerateConfig(temperature=0.5)),
        key(GenerateConfig(max_tokens=3)),
        key(GenerateConfig(seed=1)),
        key(GenerateConfig(top_p=0.9)),
        key(GenerateConfig(stop=["x"])),
        key(GenerateConfig(logprobs=True)),
        key(GenerateConfig(logprobs=True, top_logprobs=5)),
        key(GenerateConfig(response_model=Verdict)),
        key(GenerateConfig(tools=[tool])),
        key(GenerateConfig(extra={"reasoning_effort": "low"})),
        key(messages=user("hello!")),
        key(messages=[Message(role="system", content="s"), *msgs]),
        key(model="gpt-4.1-mini"),
        key(url="http://other/v1"),
        cache_key("anthropic", "gpt-4.1", None, msgs, base),
    ]
    assert len(set(variants)) == len(variants)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-" + "some-other-key-0000000000000000")
    assert key() == variants[0]  # the credential is not part of the key


def _writer(path: str, worker: int, n: int) -> None:
    cache = ResponseCache(path)
    for i in range(n):
        shared = f"shared-{i % 10}"
        for k in (f"w{worker}-{i}", shared):
            cache.put(
                k, "mock", "m", GenerateResult(text=f"{k} by {worker}", raw_response={"pad": "x" * 500})
            )
    cache.close()


def test_concurrent_writers_do_not_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cache = ResponseCache(path)
    assert len(cache) == 4 * 60 + 10
    for w in range(4):
        for i in range(60):
            hit = cache.get(f"w{w}-{i}")
            assert hit is not None and hit.text == f"w{w}-{i} by {w}"
    shared = cache.get("shared-3")
    assert shared is not None and shared.text.startswith("shared-3 by ")
    cache.close()


def test_concurrent_clients_in_one_process_share_a_cache_file(fake: FakeLLM, tmp_path: Path) -> None:
    import asyncio

    cfg = judge("openai/gpt-4.1", fake, max_concurrency=8)

    async def go() -> None:
        clients = [LLMClient.from_config(cfg, run_dir=tmp_path, stage=f"s{i}") for i in range(3)]
        await asyncio.gather(*(c.generate_many(batch(20)) for c in clients))
        for c in clients:
            await c.aclose()
        again = LLMClient.from_config(cfg, run_dir=tmp_path)
        await again.generate_many(batch(20))
        assert again.usage.cached_calls == 20
        await again.aclose()

    run(go())
    assert len(fake.requests) <= 60
    assert len(read_jsonl(tmp_path / "llm_calls.jsonl")) == 60 + 20


def test_api_keys_never_reach_cache_log_or_manifest(fake: FakeLLM, tmp_path: Path) -> None:
    keys = [OPENAI_KEY, ANTHROPIC_KEY, COMPAT_KEY]
    fake.add_rule("structured", Reply(json={"score": 1}))
    fake.add_rule("fails", Reply(json={"nope": 1}))

    async def go() -> None:
        for model in PROVIDERS:
            cfg = judge(model, fake)
            client = LLMClient.from_config(cfg, run_dir=tmp_path, stage="grade")
            await client.generate_many(batch(3))
            await client.generate(user("structured please"), GenerateConfig(response_model=Verdict))
            outs = await client.generate_many([(user("this fails"), GenerateConfig(response_model=Verdict))])
            assert type(outs[0]).__name__ == "StructuredOutputError"
            await client.aclose()
            manifest = build_manifest(config=cfg, judges={"grade": cfg.model})
            atomic_write_json(tmp_path / f"manifest-{model.split('/')[0]}.json", manifest)

    run(go())
    # The server did receive the keys, so the grep below would find a leak.
    sent = " ".join(str(r.headers) for r in fake.requests)
    assert all(k in sent for k in keys)
    files = sorted(p for p in tmp_path.iterdir() if p.is_file())
    names = {p.name for p in files}
    assert {"llm_cache.sqlite", "llm_calls.jsonl"} <= names
    assert any(n.startswith("manifest-") for n in names)
    for p in files:  # the sqlite WAL file included
        blob = p.read_bytes()
        for k in keys:
            assert k.encode() not in blob, f"{k[:8]}... leaked into {p.name}"
    assert len(read_jsonl(tmp_path / "llm_calls.jsonl")) >= 3 * 5
