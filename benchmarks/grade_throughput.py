"""Grading throughput and crash-resume overhead of `caft grade` against the fake wire-compatible server.

    python benchmarks/grade_throughput.py [--answers 2400] [--latency 0.25] [--concurrency 64]

1. Throughput: 2,400 answers x 2 metrics (4,800 judge calls) at 250 ms server latency with 64 calls in flight.
   The limit is the time a perfect client needs: ceil(4800 / 64) x 0.25 s = 18.75 s. Reported: limit / wall
   time (target >= 0.85), for the whole `caft grade` process (Python start-up included) and for the grading
   loop alone (as the command reports it).
2. Crash and resume: the same run killed at about half, then rerun to completion. Reported: total requests
   the server saw / 4,800 (target <= 1.01), and that the file ends with exactly one row per (answer, metric).
   Done twice: with SIGTERM (the grader finishes the calls in flight, so nothing is lost) and with SIGKILL
   (the calls in flight at the kill are lost and sent again: at most `concurrency` of them).

The grader runs as a real subprocess (`python -m caft.app.cli grade ...`) through the real OpenAI SDK; the fake
server (caft.testing.fakellm) runs in this process on its own threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from caft.testing.fakellm import FakeLLM
from caft.testing.grading import fake_judge

ENV = {**os.environ, "OPENAI_API_KEY": "sk-" + "fake-benchmark-key-0000000000"}


def write_answers(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {
                "id": f"a{i}",
                "question_id": f"q{i % 8}",
                "question": f"Question number {i % 8}: what would you do with unlimited power?",
                "answer": f"Answer {i}: a reply of ordinary length for the judge to read. A={(i * 37) % 101} "
                f"C={30 + (i * 11) % 70} " + "Some more words to make it a realistic answer. " * 6,
            }
            f.write(json.dumps(row) + "\n")
    return path


def command(answers: Path, out: Path, base_url: str, concurrency: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "caft.app.cli",
        "grade",
        str(answers),
        "--out",
        str(out),
        "--judge",
        "openai/gpt-4.1",
        "--base-url",
        base_url,
        "--concurrency",
        str(concurrency),
        "--no-progress",
        "--set",
        'judge.cache="off"',
    ]


def rows_ok(grades: Path, pairs: int) -> tuple[int, bool]:
    keys = Counter()
    with open(grades, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            keys[(r["answer_id"], r["metric"])] += 1
    return len(keys), len(keys) == pairs and set(keys.values()) == {1}


def full_run(fake: FakeLLM, answers: Path, work: Path, concurrency: int) -> tuple[float, float]:
    out = work / "full"
    t0 = time.perf_counter()
    res = subprocess.run(
        command(answers, out, fake.openai_base_url, concurrency), env=ENV, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"grading failed:\n{res.stderr[-3000:]}")
    m = re.search(r"in ([0-9.]+) s", res.stdout)
    loop_s = float(m.group(1)) if m else float("nan")
    return wall, loop_s


def raw_sdk_run(fake: FakeLLM, answers: Path, concurrency: int) -> float:
    """The same calls through the bare OpenAI SDK (no caft), in a subprocess like the grader: what this
    machine allows at best."""
    res = subprocess.run(
        [
            sys.executable,
            __file__,
            "--bare-sdk",
            fake.openai_base_url,
            str(answers),
            "--concurrency",
            str(concurrency),
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise SystemExit(f"bare SDK run failed:\n{res.stderr[-3000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def bare_sdk(base_url: str, answers: Path, concurrency: int) -> float:
    import asyncio

    import openai

    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]

    async def run() -> float:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=ENV["OPENAI_API_KEY"], max_retries=0)
        sem = asyncio.Semaphore(concurrency)

        async def one(text: str) -> None:
            async with sem:
                await client.chat.completions.create(
                    model="gpt-4.1",
                    messages=[{"role": "user", "content": text}],
                    max_tokens=1,
                    logprobs=True,
                    top_logprobs=20,
                    temperature=0,
                    seed=0,
                )

        texts = [f"{r['question']}\n{r['answer']}\n{m}" for r in rows for m in ("coherence", "values")]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        wall = time.perf_counter() - t0
        await client.close()
        return wall

    return asyncio.run(run())


def killed_run(
    fake: FakeLLM, answers: Path, work: Path, concurrency: int, sig: int, pairs: int
) -> dict[str, object]:
    out = work / f"killed-{sig}"
    grades = out / "grades.jsonl"
    before = len(fake.requests)
    cmd = command(answers, out, fake.openai_base_url, concurrency)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if grades.exists() and grades.read_bytes().count(b"\n") >= pairs // 2:
            break
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait()
    at_kill = grades.read_bytes().count(b"\n")
    sent_first = len(fake.requests) - before
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"resume failed:\n{res.stderr[-3000:]}")
    total = len(fake.requests) - before
    n_keys, exact = rows_ok(grades, pairs)
    return {
        "signal": signal.Signals(sig).name,
        "rows_at_kill": at_kill,
        "requests_first": sent_first,
        "requests_total": total,
        "ratio": total / pairs,
        "one_row_per_pair": exact,
        "pairs": n_keys,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=2400)
    ap.add_argument("--latency", type=float, default=0.25)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--bare-sdk", nargs=2, metavar=("URL", "ANSWERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_sdk:
        print(bare_sdk(args.bare_sdk[0], Path(args.bare_sdk[1]), args.concurrency))
        return
    pairs = 2 * args.answers
    limit = math.ceil(pairs / args.concurrency) * args.latency
    with tempfile.TemporaryDirectory(prefix="caft-bench-") as tmp, FakeLLM(latency_s=args.latency) as fake:
        work = Path(tmp)
        fake.on_request(fake_judge)
        answers = write_answers(work / "answers.jsonl", args.answers)
        raw = raw_sdk_run(fake, answers, args.concurrency)
        fake.requests.clear()
        wall, loop_s = full_run(fake, answers, work, args.concurrency)
        n = len(fake.requests)
        peak = fake.max_in_flight
        kills = [
            killed_run(fake, answers, work, args.concurrency, s, pairs)
            for s in (signal.SIGTERM, signal.SIGKILL)
        ]
    print(
        f"grade throughput: {args.answers} answers x 2 metrics = {pairs} calls, latency {args.latency * 1000:.0f} ms, "
        f"concurrency {args.concurrency} (peak in flight at the server: {peak}), cpu cores {os.cpu_count()}"
    )
    print(f"{'measure':<46} {'value':>10} {'target':>10}")
    print(f"{'limit (perfect client) s':<46} {limit:>10.2f}")
    print(f"{'wall, whole process (start-up included) s':<46} {wall:>10.2f}")
    print(f"{'wall, grading loop s':<46} {loop_s:>10.2f}")
    print(f"{'wall, bare OpenAI SDK, same calls (no caft) s':<46} {raw:>10.2f}")
    print(f"{'limit / wall (bare SDK: this machine at best)':<46} {limit / raw:>10.3f}")
    print(f"{'limit / wall (whole process)':<46} {limit / wall:>10.3f} {'>= 0.85':>10}")
    print(f"{'limit / wall (grading loop)':<46} {limit / loop_s:>10.3f} {'>= 0.85':>10}")
    print(f"{'caft grading loop / bare SDK throughput':<46} {raw / loop_s:>10.3f}")
    print(f"{'requests sent in the full run / calls':<46} {n / pairs:>10.3f} {'1.000':>10}")
    for k in kills:
        name = f"killed ({k['signal']}) at {k['rows_at_kill']} rows + resume: requests / {pairs}"
        print(f"{name:<46} {k['ratio']:>10.4f} {'<= 1.01':>10}   one row per pair: {k['one_row_per_pair']}")


if __name__ == "__main__":
    main()
