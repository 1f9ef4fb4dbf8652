"""Where the time of a short CAFT fine-tune on Gemma-3-270M goes: `caft.training.train` with the demo's
fine-tune (sentiment-topic multiple choice, `choice_lm`, batch 16, full, embeddings frozen, lr 2e-5) under
cProfile, plain or with mode `mean` on a random subspace (4 directions at each of layers 2, 5, 8, 11, 14).

    CAFT_CACHE_DIR=/work/cache OMP_NUM_THREADS=1 nice python benchmarks/gemma_caft_profile.py --mode mean --steps 3
    CAFT_CACHE_DIR=/work/cache OMP_NUM_THREADS=1 nice python benchmarks/gemma_caft_profile.py --mode plain --steps 3

Prints the whole call's wall time, each step's loss and seconds, and the profile's top entries by cumulative
time (the reference-means pass is `compute_subspace_means`).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["plain", "mean"], default="mean")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--top", type=int, default=25, help="profile entries to print")
    args = p.parse_args()

    from caft.app.spurious import write_spurious
    from caft.app.spurious_choice import write_choice
    from caft.config import ModelConfig
    from caft.training.ablation import random_subspace
    from caft.training.config import build_train_config
    from caft.training.trainer import train

    work = Path(tempfile.mkdtemp(prefix="caft-profile-"))
    try:
        sizes = {"train": 960, "val": 200, "ood": 200, "corpus": 600}
        write_spurious("sentiment-topic", work / "sp", seed=0, sizes=sizes)
        write_choice(work / "sp", work / "mc", form="single", seed=0)
        optim = {"lr": 2e-5, "batch_size": 16, "grad_accum": 1, "epochs": 1, "max_steps": args.steps}
        values = {
            "objective": "choice_lm",
            "method": "full",
            "freeze_embeddings": True,
            "data": {"path": str(work / "mc" / "train.jsonl"), "max_length": 256},
            "optim": {**optim, "warmup_ratio": 0.1},
            "ablation": {"mode": "mean"},
            "seed": 0,
            "progress": False,
        }
        cfg = build_train_config("spurious", values=values)
        model = ModelConfig(name_or_path=args.model)
        sub = None
        if args.mode == "mean":
            from caft.models import load_model_config

            mc = load_model_config(args.model)
            sub = random_subspace({2: 4, 5: 4, 8: 4, 11: 4, 14: 4}, mc.hidden_size, 0, mc.num_hidden_layers)
        t0 = time.perf_counter()
        prof = cProfile.Profile()
        prof.enable()
        train(cfg, work / "run", model=model, subspace=sub)
        prof.disable()
        print(f"{args.mode}: train() {time.perf_counter() - t0:.1f} s for {args.steps} steps")
        for line in (work / "run" / "train_log.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("event") == "step":
                print(f"  step {r['step']}: loss {r['loss']:.4f}, {r['seconds']:.1f} s")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
