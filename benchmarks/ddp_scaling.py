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
            times.append({"variant": run["variant"], "step_s": statistics.median(secs)})
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
                results[nproc] += json.loads(result.read_text())
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
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
