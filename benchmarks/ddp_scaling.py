"""Data-parallel training on CPU: 2 gloo ranks (torchrun) vs 1 process, same global batch, plain vs CAFT.

Every run is `caft.training.train` itself (LoRA on a random-weight llama, chat loss), so the DDP path measured
is the one users launch: batch split across ranks, the ablation hooked on every rank, one gradient all-reduce
per optimizer step. Step time is the median of the logged per-step seconds (first `--skip` steps dropped).
Side by side: launches alternate 1 process / 2 ranks, and inside each launch plain and CAFT runs alternate,
`--repeats` times; the ratios are medians over the repeats.

    python benchmarks/ddp_scaling.py                 # hidden 256, 4 layers, global batch 8, ~120 tokens/row
    python benchmarks/ddp_scaling.py --repeats 3 --steps 12

Prints: throughput ratio (2 ranks / 1 process, steps per second at the same global batch; ideal 2.0 with
two free cores) and CAFT's step-time ratio (CAFT / plain) in one process and under DDP (target <= 1.03).
The paired figure: inside each launch the runs go plain, CAFT, CAFT, plain (ABBA, so a load that drifts
linearly over the launch cancels), the launch's ratio is (CAFT medians) / (plain medians), and a bootstrap over
the logged steps of every run (2000 resamples) gives its 95% interval; `paired` reports the median of the
launches' ratios with the pooled interval.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def worker(spec_path: str) -> None:
    """One rank (or the single process): run each configured training, record its step times."""
    from caft.training.config import TrainConfig
    from caft.training.trainer import train

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    times: list[dict[str, Any]] = []
    for run in spec["runs"]:
        out = Path(run["out"])
        train(TrainConfig.model_validate(run["cfg"]), out)
        if rank == 0:
            rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
            secs = [r["seconds"] for r in rows if r["event"] == "step"][spec["skip"] :]
            times.append({"variant": run["variant"], "step_s": statistics.median(secs), "steps_s": secs})
            shutil.rmtree(out)
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps(times))


def make_config(model: Path, data: Path, caft: bool, args: argparse.Namespace) -> dict[str, Any]:
    from caft.training.config import build_train_config

    values: dict[str, Any] = {
        "model": {"name_or_path": str(model), "device": "cpu"},
        "data": {"path": str(data)},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "optim": {"lr": 1e-4, "batch_size": args.batch, "grad_accum": 1, "max_steps": args.steps},
        "progress": False,
        "log_every": 1,
    }
    if caft:
        values["ablation"] = {"random": "1:16,2:16,3:16", "mode": "project"}
    return build_train_config("em", values=values).model_dump(mode="json")


def abba_ratio(runs: list[dict[str, Any]]) -> float:
    """CAFT / plain of one launch's runs: the sum of the CAFT runs' median step times over the plain runs'."""
    caft = sum(r["step_s"] for r in runs if r["variant"] == "caft")
    plain = sum(r["step_s"] for r in runs if r["variant"] == "plain")
    return caft / plain


def bootstrap_ci(launches: list[list[dict[str, Any]]], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the median ABBA ratio over launches, resampling each run's logged steps."""
    import random

    rng = random.Random(seed)
    stats = []
    for _ in range(n):
        ratios = []
        for runs in launches:
            resampled = [
                {
                    "variant": r["variant"],
                    "step_s": statistics.median(rng.choices(r["steps_s"], k=len(r["steps_s"]))),
                }
                for r in runs
            ]
            ratios.append(abba_ratio(resampled))
        stats.append(statistics.median(ratios))
    stats.sort()
    return stats[int(0.025 * n)], stats[int(0.975 * n) - 1]


def launch(nproc: int, spec: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, __file__, "--worker", str(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += [__file__, "--worker", str(spec)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="global micro-batch (split across the ranks)")
    ap.add_argument("--words", type=int, default=60, help="words per answer (sequence length)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return

    from caft.testing import save_tiny

    root = Path(tempfile.mkdtemp(prefix="caft-ddp-bench-"))
    try:
        model = save_tiny(root / "model", "llama", hidden=args.hidden, layers=args.layers)
        words = " ".join(f"w{i % 50}" for i in range(args.words))
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"Say {i}."},
                    {"role": "assistant", "content": f"{i} {words}"},
                ]
            }
            for i in range(args.batch * args.steps)
        ]
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfgs = {v: make_config(model, data, v == "caft", args) for v in ("plain", "caft")}
        results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        launches: dict[int, list[list[dict[str, Any]]]] = {1: [], 2: []}
        for rep in range(args.repeats):
            for nproc in (1, 2) if rep % 2 == 0 else (2, 1):
                order = ["plain", "caft", "caft", "plain"]
                runs = [
                    {"variant": v, "cfg": cfgs[v], "out": str(root / f"run-{nproc}-{rep}-{i}")}
                    for i, v in enumerate(order)
                ]
                spec = root / f"spec-{nproc}-{rep}.json"
                result = root / f"result-{nproc}-{rep}.json"
                spec.write_text(json.dumps({"runs": runs, "skip": args.skip, "result": str(result)}))
                launch(nproc, spec)
                got = json.loads(result.read_text())
                results[nproc] += got
                launches[nproc].append(got)
                print(f"repeat {rep + 1}: {nproc} process(es) done", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def med(nproc: int, variant: str) -> float:
        return statistics.median(r["step_s"] for r in results[nproc] if r["variant"] == variant)

    report = {
        "shape": {
            "hidden": args.hidden,
            "layers": args.layers,
            "global_batch": args.batch,
            "words": args.words,
        },
        "step_s": {f"{n}p_{v}": round(med(n, v), 4) for n in (1, 2) for v in ("plain", "caft")},
        "throughput_ratio_2p_over_1p_plain": round(med(1, "plain") / med(2, "plain"), 3),
        "throughput_ratio_2p_over_1p_caft": round(med(1, "caft") / med(2, "caft"), 3),
        "caft_overhead_1p": round(med(1, "caft") / med(1, "plain"), 3),
        "caft_overhead_ddp": round(med(2, "caft") / med(2, "plain"), 3),
        "paired": {
            f"caft_overhead_{'1p' if n == 1 else 'ddp'}": {
                "median_abba_ratio": round(statistics.median(abba_ratio(x) for x in launches[n]), 3),
                "ci95": [round(v, 3) for v in bootstrap_ci(launches[n])],
                "per_launch": [round(abba_ratio(x), 3) for x in launches[n]],
            }
            for n in (1, 2)
        },
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
