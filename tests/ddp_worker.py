"""One rank of a data-parallel training job for the distributed tests, started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py SPEC.json

SPEC: {"runs": [{"cfg": TrainConfig as JSON, "out": DIR, "resume": bool, "slow_s": seconds added to each
optimizer step (so that a test can kill a rank mid-run), "stop_after": stop_after_steps}], "pid_dir": where
each rank writes its pid}. The launcher's environment picks DDP or FSDP (`ACCELERATE_USE_FSDP`)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import caft.training.trainer as trainer
from caft.training.config import TrainConfig


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    if spec.get("pid_dir"):
        Path(spec["pid_dir"], f"rank-{rank}").write_text(str(os.getpid()))
    delay = [0.0]
    clip = trainer.clip_gradients

    def slow_clip(cfg: TrainConfig, model: Any) -> float | None:
        time.sleep(delay[0])
        return clip(cfg, model)

    trainer.clip_gradients = slow_clip
    for run in spec["runs"]:
        delay[0] = float(run.get("slow_s", 0.0))
        cfg = TrainConfig.model_validate(run["cfg"])
        trainer.train(
            cfg, run["out"], resume=run.get("resume", False), stop_after_steps=run.get("stop_after")
        )
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main()
