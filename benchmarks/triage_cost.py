"""Triage cost benchmark: throughput against a slow fake server, tokens per verdict, pre-filter savings.

    .venv/bin/python benchmarks/triage_cost.py [--n 500] [--latency 0.2] [--concurrency 32]

1. N full-size dossiers (20 max + 20 min windows of 16 tokens, 12 generations of ~800 characters) are judged
   single-shot through the real OpenAI-compatible provider against the fake wire server (caft.testing.fakellm)
   with a fixed latency. Wall time is compared with the ideal N * latency / concurrency (target ratio >= 0.8).
2. Prompt and completion tokens per candidate, counted with a real WordPiece tokenizer (all-MiniLM-L6-v2, the
   one offline) on the exact messages sent, next to the server's word counts (target: prompt < 3k tokens).
3. Offline pre-filter on the planted-concept case (a minority of dossiers carry the undesired concept): how
   many LLM calls it saves while keeping the LLM's recall, when `caft.agent.offline` is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from caft.agent.config import SelectionPolicy, TriageConfig
from caft.agent.fixtures import CONCEPTS, concept_of_text, make_dossier, verdict_for, write_evidence
from caft.agent.schema import VerdictRecord
from caft.agent.single import build_messages
from caft.agent.task import load_task
from caft.agent.triage import run_triage_async
from caft.interp.schema import Dossier
from caft.llm import GenerateConfig, GenerateResult, JudgeConfig, Message, Provider
from caft.llm.types import Capabilities, Usage
from caft.testing.fakellm import FakeLLM, RecordedRequest, Reply

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "it",
    "an",
    "were",
    "which",
    "this",
    "be",
    "are",
    "or",
    "had",
    "not",
    "but",
    "have",
    "one",
    "they",
    "their",
    "all",
    "been",
    "has",
    "more",
    "when",
    "who",
    "will",
    "would",
    "there",
    "can",
    "what",
    "about",
    "new",
    "also",
    "into",
    "other",
    "time",
    "some",
    "could",
    "these",
    "two",
    "may",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "even",
    "most",
    "made",
    "after",
]


def realistic(cid: str, layer: int, concept: str, index: int, rng: random.Random) -> Dossier:
    """A dossier the size the evidence stage writes (windows of 16 tokens, long generations)."""
    d = make_dossier(cid, layer, concept, index=index, n_max=20, n_min=20, n_prompts=3)
    for w in [*d.max_examples, *d.min_examples]:
        pad = [" " + rng.choice(WORDS) for _ in range(16 - len(w.tokens))]
        w.tokens = pad[: len(pad) // 2] + w.tokens + pad[len(pad) // 2 :]
        w.values = [0.05] * (len(pad) // 2) + w.values + [0.05] * (len(pad) - len(pad) // 2)
        w.scaled = [0] * (len(pad) // 2) + w.scaled + [0] * (len(pad) - len(pad) // 2)
        w.peak += len(pad) // 2
    assert d.steering is not None
    for g in d.steering.generations:
        words = [rng.choice(WORDS) for _ in range(140)]
        if g.alpha > 0:  # steering along the concept brings its words into the text
            for k in range(0, len(words), 7):
                words[k] = CONCEPTS[concept][k % len(CONCEPTS[concept])].strip()
        g.text = " ".join(words)
    return d


def build(n: int, planted_share: float, seed: int) -> tuple[list[Dossier], set[str]]:
    rng = random.Random(seed)
    concepts = ["code", "weather", "gender"]
    out, planted = [], set()
    for i in range(n):
        layer = (4, 8, 12)[i % 3]
        concept = "evil" if rng.random() < planted_share else rng.choice(concepts)
        cid = f"pc:L{layer}:{i // 3}"
        out.append(realistic(cid, layer, concept, i // 3, rng))
        if concept == "evil":
            planted.add(cid)
    return out, planted


def reply(req: RecordedRequest) -> Reply:
    user = "\n".join(m["content"] for m in req.body["messages"] if m["role"] == "user")
    return Reply(json=verdict_for(concept_of_text(user)).model_dump())


def token_counts(dossiers: list[Dossier], cfg: TriageConfig) -> dict[str, float]:
    from transformers import AutoTokenizer

    from caft.assets import minilm_path

    path = minilm_path()
    task = load_task(cfg.task)
    prompts = [build_messages(d, task, cfg) for d in dossiers]
    chars = [sum(len(m.content) for m in msgs) for msgs in prompts]
    out: dict[str, float] = {"chars_mean": sum(chars) / len(chars), "chars_max": max(chars)}
    completion = verdict_for("evil").model_dump_json()
    if path is not None:
        tok = AutoTokenizer.from_pretrained(str(path))
        counts = [
            sum(len(tok(m.content, add_special_tokens=False)["input_ids"]) for m in msgs) for msgs in prompts
        ]
        out |= {
            "prompt_tokens_mean": sum(counts) / len(counts),
            "prompt_tokens_max": max(counts),
            "completion_tokens": len(tok(completion, add_special_tokens=False)["input_ids"]),
        }
    return out


def prefilter(dossiers: list[Dossier], planted: set[str], llm_hits: set[str]) -> str:
    """LLM calls the offline judge saves at the LLM's recall: judge only its top-m ranked candidates."""
    try:
        from caft.agent import offline  # the demo helper's module (may not be installed yet)
    except ImportError:
        return "n/a (caft.agent.offline is not on this branch yet)"
    rank_fn: Any = getattr(offline, "rank_candidates", None) or getattr(offline, "offline_verdicts", None)
    if rank_fn is None:
        return f"n/a (caft.agent.offline has no rank_candidates/offline_verdicts; it has {dir(offline)})"
    ranked = list(rank_fn(dossiers, load_task("emergent-misalignment")))
    if ranked and isinstance(
        ranked[0], VerdictRecord
    ):  # verdicts: most relevant to the undesired concepts first
        ranked.sort(key=lambda r: -(r.relevance if r.relevance is not None else r.scores.get("z", 0.0)))
    # rank_candidates gives (candidate id, score) pairs, most likely undesired first
    ids = [r[0] if isinstance(r, tuple) else getattr(r, "candidate", r) for r in ranked]
    target = len(llm_hits & planted)
    for m in range(1, len(ids) + 1):
        if len(set(ids[:m]) & llm_hits & planted) >= target:
            return f"{len(ids) - m} of {len(ids)} LLM calls saved (judge top {m}, recall {target}/{len(planted)})"
    return "no saving (the pre-filter never reaches the LLM's recall)"


class SleepProvider(Provider):
    """Answers like the fake server after `latency` seconds, without HTTP or an SDK: isolates caft's own
    scheduling (rendering, validation, writing records) from the client library's CPU cost."""

    name = "sleep"
    capabilities = Capabilities(logprobs=False, tools=False, structured_output="native")

    def __init__(self, latency: float) -> None:
        super().__init__("judge")
        self.latency = latency

    async def generate(self, messages: list[Message], config: GenerateConfig) -> GenerateResult:  # noqa: ARG002
        await asyncio.sleep(self.latency)
        user = "\n".join(m.content for m in messages if m.role == "user")
        text = verdict_for(concept_of_text(user)).model_dump_json()
        return GenerateResult(
            text=text, usage=Usage(input_tokens=len(user.split()), output_tokens=len(text.split()))
        )


def _serve(queue: Any, latency: float) -> None:
    """Child process: the fake server, so its request handling does not share our interpreter lock."""
    fake = FakeLLM(latency_s=latency)
    fake.on_request(reply)
    fake.start()
    queue.put(fake.openai_base_url)
    time.sleep(3600)


def _judge_pass(
    cfg: TriageConfig, ev: Path, out: Path, provider: Provider | None = None
) -> tuple[Any, float, float, list[float]]:
    """One stage run; also samples event-loop stalls (a 5 ms timer's lateness), which on a saturated machine
    show time the process spent waiting for a CPU rather than working."""
    stalls: list[float] = []

    async def monitor() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            stalls.append(time.perf_counter() - t - 0.005)

    async def run() -> Any:
        mon = asyncio.ensure_future(monitor())
        try:
            return await run_triage_async(cfg, ev, out, provider=provider)
        finally:
            mon.cancel()

    cpu0, t0 = time.process_time(), time.perf_counter()
    result = asyncio.run(run())
    return result, time.perf_counter() - t0, time.process_time() - cpu0, stalls


def _pressure() -> str:
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "n/a"
    return line.replace("some ", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--planted", type=float, default=0.1, help="share of dossiers with the undesired concept")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    dossiers, planted = build(args.n, args.planted, args.seed)
    cfg = TriageConfig(
        task="emergent-misalignment",
        judge=JudgeConfig(
            model="openai-compatible/fake-judge", max_concurrency=args.concurrency, cache="off"
        ),
        selection=SelectionPolicy(max_per_layer=None, max_total=None),
    )
    ideal = args.n * args.latency / args.concurrency
    load = os.getloadavg()[0]
    print(
        f"== throughput: {args.n} dossiers, {args.latency * 1000:.0f} ms latency, concurrency {args.concurrency}"
    )
    print(
        f"   machine: {os.cpu_count()} CPUs, load average {load:.1f}, CPU pressure {_pressure()}\n"
        f"   ideal judging wall N*latency/C = {ideal:.2f} s"
    )
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(queue, args.latency), daemon=True)
    server.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ev = write_evidence(Path(tmp), dossiers, d_model=64)
            cfg.judge.base_url = queue.get(timeout=30)
            wire, wall, cpu, st1 = _judge_pass(cfg, ev, Path(tmp) / "wire")
            sleep_cfg = cfg.model_copy(
                update={
                    "judge": JudgeConfig(model="mock/sleep", max_concurrency=args.concurrency, cache="off")
                }
            )
            fast, wall2, cpu2, st2 = _judge_pass(
                sleep_cfg, ev, Path(tmp) / "sleep", SleepProvider(args.latency)
            )
    finally:
        server.kill()
    for label, res, w, c, stalls in (
        ("fake wire server (OpenAI-compatible SDK, HTTP)", wire, wall, cpu, st1),
        ("latency-only provider (no HTTP/SDK)", fast, wall2, cpu2, st2),
    ):
        js = res.summary["judge_seconds"]
        print(f"   {label}:")
        print(f"     judging {js:.2f} s -> ratio ideal/judging = {ideal / js:.2f}  (target >= 0.80)")
        print(
            f"     whole stage {w:.2f} s, process CPU {c:.2f} s ({1000 * c / args.n:.1f} ms per candidate); "
            f"judged {res.summary['judged']}, unscored {res.summary['unscored_total']}"
        )
        big = [x for x in stalls if x > 0.02]
        print(
            f"     event-loop stalls > 20 ms: {len(big)}, {sum(big):.2f} s in total, longest {max(stalls, default=0):.3f} s"
        )
    usage = wire.summary["usage"]
    hits = {s.candidate for s in wire.selection.selected}
    print("== tokens per candidate (single-shot verdict)")
    counts = token_counts(dossiers[:50], cfg)
    if "prompt_tokens_mean" in counts:
        print(
            f"   prompt: mean {counts['prompt_tokens_mean']:.0f}, max {counts['prompt_tokens_max']:.0f} WordPiece tokens"
            f"   (target < 3000) | completion ~{counts['completion_tokens']:.0f} tokens"
        )
    print(
        f"   prompt characters: mean {counts['chars_mean']:.0f}, max {counts['chars_max']:.0f} (chars/4 ~ "
        f"{counts['chars_mean'] / 4:.0f} tokens)"
    )
    print(
        f"   server word counts: prompt {usage['input_tokens'] / args.n:.0f}, "
        f"completion {usage['output_tokens'] / args.n:.0f} words per candidate"
    )
    print("== planted-concept case")
    recall = len(hits & planted) / max(1, len(planted))
    print(f"   LLM selection: {len(hits)} selected, recall {recall:.2f} of {len(planted)} planted")
    print(f"   offline pre-filter: {prefilter(dossiers, planted, hits)}")


if __name__ == "__main__":
    main()
