"""Throughput of the LLM layer against the fake server, and the cost of a warm-cache rerun.

2,000 single-token judge calls (temperature 0, logprobs top-20, as the misalignment grader sends them) through
the real SDK client to the fake server, which answers each after a fixed latency L. With a concurrency limit C
the best possible throughput is C / L requests per second; the ratio achieved / (C/L) shows what the client
costs (target >= 0.85). Then the same batch again with a new client on the same cache: it must send no request
and take < 5% of the cold time.

The fake server runs in its own process (as a real server would), so its threads do not compete with the
client for the interpreter lock; `--in-process` runs it in a thread instead. The client's CPU time per call is
printed too: the client runs on one core (one event loop), so it reaches 0.85 * C/L only if a call costs at most
1 / (0.85 * C/L) of CPU time and that core is free; on a loaded machine the ratio measures the machine. So a
reference pass first sends the same calls through the bare SDK client (a semaphore, nothing else): the
`caft / bare SDK` line is the layer's own cost, independent of the machine's load.

    .venv/bin/python benchmarks/llm_throughput.py                 # 2000 calls, L=200 ms, C=32, openai
    .venv/bin/python benchmarks/llm_throughput.py --provider anthropic --calls 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from caft.llm import GenerateConfig, GenerateResult, LLMClient, Message, get_provider
from caft.testing.fakellm import FakeLLM, Reply

KEY_ENV = "CAFT_BENCH_FAKE_KEY"
MODELS = {"openai": "openai/gpt-4.1", "anthropic": "anthropic/claude-sonnet-4-6"}


def requests(n: int, logprobs: bool) -> list[tuple[list[Message], GenerateConfig]]:
    cfg = GenerateConfig(temperature=0.0, max_tokens=1, logprobs=logprobs, top_logprobs=20, seed=0)
    return [
        ([Message(role="user", content=f"Rate answer #{i} from 0 to 100. Reply with a number only.")], cfg)
        for i in range(n)
    ]


@dataclass
class Server:
    url: str
    stats: dict[str, int]

    def refresh(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/_fake/stats", timeout=10) as r:
            self.stats = json.loads(r.read())
        return self.stats


@contextlib.contextmanager
def serve(latency: float, in_process: bool) -> Iterator[Server]:
    if in_process:
        with FakeLLM(latency_s=latency) as fake:
            fake.default = Reply(text="7", top_logprobs={str(k): -0.1 * (k + 1) for k in range(21)})
            yield Server(fake.url, {})
        return
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "caft.testing.fakellm",
            "--latency",
            str(latency),
            "--text",
            "7",
            "--top-logprobs",
            "21",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"the fake server did not start: {line!r}")
        yield Server(line.split(" ", 1)[1], {})
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def one_pass(
    server: Server, model: str, args: argparse.Namespace, cache: Path, log: Path
) -> tuple[float, float, int, int]:
    """(wall seconds, client CPU seconds, requests the server saw, failed calls) for one pass of the batch."""
    base = server.url if model.startswith("anthropic/") else f"{server.url}/v1"
    provider = get_provider(model, base_url=base, api_key_env=KEY_ENV, timeout_s=30.0)
    client = LLMClient(
        provider, max_concurrency=args.concurrency, timeout_s=30.0, cache_path=cache, call_log=log
    )
    reqs = requests(args.calls, logprobs=client.capabilities.logprobs)
    before = server.refresh()["requests"]
    t0, c0 = time.perf_counter(), time.process_time()
    outs = await client.generate_many(reqs)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await client.aclose()
    failed = sum(not isinstance(o, GenerateResult) for o in outs)
    return elapsed, cpu, server.refresh()["requests"] - before, failed


async def bare_sdk_pass(server: Server, model: str, args: argparse.Namespace) -> tuple[float, float]:
    """The same calls through the bare SDK client with only a semaphore (no caft): (wall s, CPU s). This is
    what the machine allows at best, so `caft / bare` isolates the layer's own cost from the machine's load."""
    import anthropic
    import openai

    key = os.environ[KEY_ENV]
    name = model.split("/", 1)[1]
    sem = asyncio.Semaphore(args.concurrency)
    prompts = [r[0][0].content for r in requests(args.calls, logprobs=False)]
    if model.startswith("anthropic/"):
        ac = anthropic.AsyncAnthropic(base_url=server.url, api_key=key, max_retries=0)

        async def one(text: str) -> None:
            async with sem:
                await ac.messages.create(
                    model=name,
                    max_tokens=1,
                    messages=[{"role": "user", "content": text}],
                    extra_body={"temperature": 0.0},
                )

        close = ac.close
    else:
        oc = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)

        async def one(text: str) -> None:
            async with sem:
                await oc.chat.completions.create(
                    model=name,
                    messages=[{"role": "user", "content": text}],
                    max_completion_tokens=1,
                    temperature=0.0,
                    seed=0,
                    logprobs=True,
                    top_logprobs=20,
                )

        close = oc.close
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(t) for t in prompts))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await close()
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--provider", choices=sorted(MODELS), default="openai")
    parser.add_argument(
        "--in-process", action="store_true", help="run the fake server in a thread of this process"
    )
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-SDK reference pass")
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "fake-key-for-the-local-fake-server")
    model = MODELS[args.provider]
    limit = args.concurrency / args.latency

    with tempfile.TemporaryDirectory() as tmp, serve(args.latency, args.in_process) as server:
        cache, log = Path(tmp) / "llm_cache.sqlite", Path(tmp) / "llm_calls.jsonl"
        bare, bare_cpu = (0.0, 0.0) if args.no_bare else asyncio.run(bare_sdk_pass(server, model, args))
        cold, cold_cpu, cold_reqs, cold_failed = asyncio.run(one_pass(server, model, args, cache, log))
        max_in_flight = server.refresh()["max_in_flight"]
        warm, warm_cpu, warm_reqs, warm_failed = asyncio.run(one_pass(server, model, args, cache, log))

    achieved = args.calls / cold
    where = "an in-process thread" if args.in_process else "a separate process"
    load = os.getloadavg()[0]
    print(
        f"{model} via the real SDK, {args.calls} calls, latency {args.latency * 1000:.0f} ms, "
        f"C={args.concurrency}; fake server in {where}; {os.cpu_count()} CPUs, load average {load:.1f}"
    )
    print(f"{'':28}{'measured':>14}{'target':>14}")
    print(f"{'cold time (s)':28}{cold:>14.2f}{args.calls / limit:>14.2f}")
    print(f"{'throughput (req/s)':28}{achieved:>14.1f}{limit:>14.1f}")
    print(f"{'throughput / (C/L)':28}{achieved / limit:>14.3f}{'>= 0.85':>14}")
    cpu_ms = 1000 * cold_cpu / args.calls
    cpu_target = f"<= {1000 / (0.85 * limit):.2f}"
    print(f"{'client CPU per call (ms)':28}{cpu_ms:>14.2f}{cpu_target:>14}")
    print(f"{'client CPU / wall time':28}{cold_cpu / cold:>14.2f}")
    if not args.no_bare:
        print(f"{'bare SDK: throughput/(C/L)':28}{args.calls / bare / limit:>14.3f}")
        print(f"{'bare SDK: CPU per call (ms)':28}{1000 * bare_cpu / args.calls:>14.2f}")
        print(f"{'caft / bare SDK throughput':28}{bare / cold:>14.3f}")
    print(f"{'max in flight (server)':28}{max_in_flight:>14d}{'<= ' + str(args.concurrency):>14}")
    print(f"{'requests sent, cold':28}{cold_reqs:>14d}{args.calls:>14d}")
    print(f"{'failed calls, cold':28}{cold_failed:>14d}{0:>14d}")
    print(f"{'warm rerun time (s)':28}{warm:>14.3f}")
    print(f"{'warm rerun CPU (s)':28}{warm_cpu:>14.3f}")
    print(f"{'warm / cold time':28}{warm / cold:>14.4f}{'< 0.05':>14}")
    print(f"{'requests sent, warm':28}{warm_reqs:>14d}{0:>14d}")
    print(f"{'failed calls, warm':28}{warm_failed:>14d}{0:>14d}")


if __name__ == "__main__":
    main()
