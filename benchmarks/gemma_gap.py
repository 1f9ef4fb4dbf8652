"""The generalization gap of plain fine-tuning on a causal LM: ID vs OOD accuracy of the spurious tasks in
multiple-choice form, per seed, through the demo's own run folders (`caft demo --model ...` then reuses
the trained model: its `train` stage is done).

    CAFT_CACHE_DIR=/work/cache nice python benchmarks/gemma_gap.py --model gemma-3-270m \
        --task sentiment-topic --seeds 0 1 2 --out runs/gemma-demo [--form double] [--steps 18]

Prints one row per seed (ID, OOD, train and eval seconds) and writes `OUT/gap.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="sentiment-topic")
    ap.add_argument("--form", default="single", choices=["single", "double"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--out", default="runs/gemma-demo")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from caft.app.demo import DemoConfig, demo_run_config
    from caft.app.demo_lm import write_lm_data
    from caft.app.pipeline import run_pipeline
    from caft.evals.mc import run_mc_eval
    from caft.rundir import atomic_write_json

    cfg = DemoConfig(model=args.model, task=args.task, form=args.form, steps=args.steps)
    root = Path(args.out)
    rows = []
    for seed in args.seeds:
        seed_dir = root / f"seed{seed}"
        if not (seed_dir / "data" / "meta.json").is_file():
            write_lm_data(cfg, seed_dir, seed)
        rc = demo_run_config(cfg, seed_dir, seed)
        t0 = time.perf_counter()
        run_pipeline(rc, only="train")
        t1 = time.perf_counter()
        cc = rc.classification
        assert cc.val is not None
        ft = rc.model.model_copy(update={"name_or_path": str(Path(rc.out_dir) / "train" / "final")})
        mc = run_mc_eval(ft, cc.val, seed_dir / "gap_eval", ood_path=cc.ood, batch_size=cc.batch_size)["mc"]
        t2 = time.perf_counter()
        row = {
            "seed": seed,
            "id": mc["id"]["rate"],
            "ood": mc["ood"]["rate"],
            "train_s": round(t1 - t0, 1),
            "eval_s": round(t2 - t1, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "model": args.model,
        "task": args.task,
        "form": args.form,
        "steps": args.steps,
        "rows": rows,
        "mean_id": statistics.fmean(r["id"] for r in rows),
        "mean_ood": statistics.fmean(r["ood"] for r in rows),
    }
    atomic_write_json(root / f"gap-{args.task}-{args.form}.json", report)
    print(f"mean ID {report['mean_id']:.1%}  mean OOD {report['mean_ood']:.1%}")


if __name__ == "__main__":
    main()
