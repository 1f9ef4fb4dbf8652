"""The LLM path of `caft triage bench` on a real demo seed, with a keyword stand-in for the LLM.

A fake OpenAI-compatible server (caft.testing.fakellm) answers each blind single-shot prompt by counting the
highlighted words: topic nouns (caft.app.spurious's word lists) against sentiment adjectives. It is not an LLM
and its numbers say nothing about one; it exercises blind rendering, the wire format, calibration on the
random controls and the benchmark's scoring at full size, and checks that no prompt leaks an id or a rank.

    python benchmarks/judge_bench_keyword.py OUT/seed0     # a `caft demo` seed folder (sentiment-topic)
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

from caft.agent.bench import BenchConfig, run_bench
from caft.agent.config import SelectionPolicy, TriageConfig
from caft.app.spurious import FOOD, NEGATIVE, POSITIVE, SPORTS
from caft.testing.fakellm import FakeLLM, RecordedRequest, Reply

TOPIC = {w.lower() for w in SPORTS + FOOD}
SENTIMENT = {w.lower() for w in POSITIVE + NEGATIVE}
MARK = re.compile(r"⟦([^|⟧]+)\|(\d+)⟧")
LEAK = re.compile(r"pc:|null|kind |Rankings|explained_variance")


def keyword_verdict(user: str) -> dict[str, Any]:
    """Undesired when the marked words are mostly topic nouns, intended when mostly sentiment words."""
    marks = [(m.group(1).lower(), int(m.group(2))) for m in MARK.finditer(user)]
    topic = sum(v for w, v in marks if w in TOPIC)
    sent = sum(v for w, v in marks if w in SENTIMENT)
    share = topic / (topic + sent) if topic + sent else 0.0
    relation = "undesired" if share > 0.6 else ("intended" if share < 0.3 and sent else "unclear")
    confidence = 0.5 if relation == "unclear" else round(0.5 + abs(share - 0.5), 3)
    return {
        "label": "topic words" if relation == "undesired" else "other",
        "description": "keyword count of the marked words",
        "relation": relation,
        "confidence": confidence,
        "evidence": ["ex:max:0"],
        "rationale": f"topic share of the marks {share:.2f}",
    }


def main(seed_dir: str) -> None:
    seed = Path(seed_dir)
    prompts: list[str] = []

    def reply(req: RecordedRequest) -> Reply:
        user = req.body["messages"][-1]["content"]
        prompts.append(user)
        return Reply(json=keyword_verdict(user))

    with FakeLLM() as fake:
        fake.on_request(reply)
        judge = {"model": "openai-compatible/keyword", "base_url": fake.openai_base_url, "max_concurrency": 8}
        cfg = BenchConfig(
            data=str(seed / "data"),
            run=str(seed / "run"),
            out=str(seed / "run" / "bench" / "keyword"),
            triage=TriageConfig(
                kind="single",
                task=str(seed / "data" / "task.yaml"),
                judge=judge,
                selection=SelectionPolicy(threshold=0.5, max_per_layer=5, max_total=None),
            ),
            results=str(seed),
        )
        t = time.perf_counter()
        run_bench(cfg)
        print(f"{len(prompts)} prompts in {time.perf_counter() - t:.1f} s; leaking an id or rank: "
              f"{sum(bool(LEAK.search(p)) for p in prompts)}")  # fmt: skip
    print((seed / "run" / "bench" / "keyword" / "bench.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1])
