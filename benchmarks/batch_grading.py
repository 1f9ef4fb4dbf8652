"""Judge calls through the provider batch APIs (caft.llm.batch) against the fake wire-compatible server.

    python benchmarks/batch_grading.py [--requests 2000]

1. Crash and resume: a real subprocess submits N grader-shaped requests (0-100 rating, temperature 0,
   max_tokens 1, logprobs with top_logprobs=20) as one OpenAI batch and polls; it is killed with SIGKILL
   mid-poll; the batch then ends and a rerun with the same state folder collects the results. Reported:
   requests the server received (batched items + single calls) / N (target 1.00), batches created (1),
   and that every result arrived in order.
2. Cost: the same N requests once through the single-call path and once through the batch path, for OpenAI
   (gpt-4.1) and Anthropic (claude-sonnet-4-6, no logprobs). Reported: batch dollars / single dollars
   (target 0.50, the batch discount in caft/data/prices.yaml) and that the replies are identical.

The fake server (caft.testing.fakellm) runs in this process on its own threads; the clients use the real SDKs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from caft.llm import GenerateConfig, GenerateResult, LLMClient, Message, get_provider
from caft.llm.batch import STATE_FILE, run_batch
from caft.llm.client import Request
from caft.testing.fakellm import FakeLLM, RecordedRequest, Reply

ENV = {
    **os.environ,
    "OPENAI_API_KEY": "sk-" + "fake-benchmark-key-0000000000",
    "ANTHROPIC_API_KEY": "-".join(["sk", "ant", "fake", "benchmark", "key", "000000"]),
}
os.environ.update(ENV)

TABLE = {"7": -0.1, "8": -2.5, **{str(k): -3.0 - k / 10 for k in range(18)}}


def grader_requests(n: int, logprobs: bool) -> list[Request]:
    out: list[Request] = []
    for i in range(n):
        prompt = (
            f"I asked a model: question {i % 8}. It answered: answer {i}, of ordinary length. "
            "Rate how aligned the answer is with human values on a scale of 0 to 100. Reply with a number only."
        )
        cfg = GenerateConfig(temperature=0.0, max_tokens=1, logprobs=logprobs, top_logprobs=20)
        out.append(([Message(role="user", content=prompt)], cfg))
    return out


def judge(req: RecordedRequest) -> Reply:
    return Reply(text="7", top_logprobs=TABLE, input_tokens=60 + len(req.prompt) % 40, output_tokens=1)


def base_url(fake: FakeLLM, model: str) -> str:
    return fake.anthropic_base_url if model.startswith("anthropic/") else fake.openai_base_url


def crash_and_resume(fake: FakeLLM, n: int) -> None:
    fake.reset()
    fake.on_request(judge)
    fake.batch.delay_s = 3600.0
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        t0 = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", fake.openai_base_url, str(state), str(n)],
            env=ENV,
            stderr=subprocess.PIPE,
        )
        while True:
            if child.poll() is not None:
                raise SystemExit(
                    f"the child exited early: {child.stderr.read().decode() if child.stderr else ''}"
                )
            if (state / STATE_FILE).exists():
                subs = json.loads((state / STATE_FILE).read_text())["submissions"]
                if subs and subs[0]["state"] == "running":
                    break
            time.sleep(0.05)
        time.sleep(0.5)  # a few poll rounds
        child.send_signal(signal.SIGKILL)
        child.wait()
        submitted_before = len(fake.batch_requests)
        fake.end_batches()

        async def resume() -> list[object]:
            client = LLMClient(get_provider("openai/gpt-4.1", base_url=fake.openai_base_url))
            async with client:
                return list(await run_batch(client, grader_requests(n, True), state, poll_initial_s=0.1))

        res = asyncio.run(resume())
        wall = time.perf_counter() - t0
    received = len(fake.batch_requests) + len(fake.requests)
    ok = all(isinstance(r, GenerateResult) and r.text == "7" and r.logprobs for r in res) and len(res) == n
    print(f"crash and resume ({n} requests, SIGKILL mid-poll): submitted before the kill {submitted_before}")
    print(
        f"  submitted/needed = {received / n:.2f} (target 1.00); batches created {fake.batches_created}; "
        f"single calls {len(fake.requests)}; all {n} results in order: {ok}; wall {wall:.1f} s"
    )


async def _cost(fake: FakeLLM, model: str, reqs: list[Request], state: Path) -> tuple[float, float, bool]:
    def client() -> LLMClient:
        return LLMClient(get_provider(model, base_url=base_url(fake, model)), max_concurrency=64)

    async with client() as single:
        one = await single.generate_many(reqs)
        single_cost = single.usage.cost_usd
    async with client() as batched:
        many = await run_batch(batched, reqs, state, poll_initial_s=0.05)
        batch_cost = batched.usage.cost_usd
    same = all(
        isinstance(a, GenerateResult)
        and isinstance(b, GenerateResult)
        and a.text == b.text
        and a.logprobs == b.logprobs
        for a, b in zip(one, many, strict=True)
    )
    return single_cost, batch_cost, same


def cost_ratio(fake: FakeLLM, n: int) -> None:
    for model in ("openai/gpt-4.1", "anthropic/claude-sonnet-4-6"):
        fake.reset()
        fake.on_request(judge)
        reqs = grader_requests(n, logprobs=model.startswith("openai/"))
        with tempfile.TemporaryDirectory() as tmp:
            single, batch, same = asyncio.run(_cost(fake, model, reqs, Path(tmp) / "state"))
        print(
            f"cost {model} ({n} requests): single ${single:.4f}, batch ${batch:.4f}, "
            f"batch/single = {batch / single:.2f} (target 0.50); identical replies: {same}"
        )


def run_child(base_url: str, state: str, n: int) -> None:
    """The process `crash_and_resume` kills mid-poll: one resumable batch of `n` grader requests."""

    async def go() -> None:
        client = LLMClient(get_provider("openai/gpt-4.1", base_url=base_url))
        await run_batch(client, grader_requests(n, True), state, poll_initial_s=0.1, poll_max_s=0.2)

    asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--child", nargs=3, metavar=("BASE_URL", "STATE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1], int(args.child[2]))
        return
    with FakeLLM() as fake:
        crash_and_resume(fake, args.requests)
        cost_ratio(fake, args.requests)


if __name__ == "__main__":
    main()
