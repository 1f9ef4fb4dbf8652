"""A fine-tune in several processes, started from one: how `caft run` scales its training stages out.

`caft run` itself stays one process (the judges, the evals and the reports must run once); with
`launch.processes: N` (> 1) in the run config, each fine-tune of the run (the `train` and `caft` stages, the
loop's rounds, the random and top-k baselines) is started here as a torchrun job of N ranks on this machine,
DDP, or FSDP2 with `launch.fsdp: true` (`caft.training.distributed`), and waited for. The job's ranks run
`python -m caft.training.launch CONFIG OUT`, which is `caft.training.train(config, OUT, resume=True)`:

- the config the ranks train with is written to `OUT/launch/train.yaml` first (the model and, for CAFT, the
  subspace saved to `OUT/launch/subspace/`, named in `ablation.subspace`), so what ran can be read back;
- a job that dies (any rank) raises `TrainingLaunchError` with the tail of its output in the message, after
  the checkpoints written so far; rerunning the stage resumes from the newest one, with any number of ranks;
- after the job, this process calls `train(..., resume=True)` on the same folder and config: the run is
  finished there, so it returns the result (final path, metrics) without training.

One process (`processes: 1`, the default) calls `train` directly, as before. Multi-node jobs are started
with a launcher around `caft train` (docs/scaling.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from caft.errors import CaftError

if TYPE_CHECKING:
    from caft.config import ModelConfig
    from caft.subspace import Subspace
    from caft.training.config import TrainConfig
    from caft.training.trainer import TrainResult

LAUNCH_DIR = "launch"
"""Folder inside a launched fine-tune's output: the config its ranks read, the subspace, the job's output."""
OUTPUT_TAIL = 4000


class TrainingLaunchError(CaftError):
    """A multi-process fine-tune ended with an error on some rank."""


def train_maybe_launched(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    model: ModelConfig | None = None,
    subspace: Subspace | None = None,
    processes: int = 1,
    fsdp: bool = False,
) -> TrainResult:
    """`train(cfg, out_dir, model=model, subspace=subspace, resume=True)`, in `processes` ranks when > 1."""
    from caft.training.trainer import train

    if processes <= 1:
        return train(cfg, out_dir, model=model, subspace=subspace, resume=True)
    from caft.config import config_to_yaml

    out = Path(out_dir)
    launch = out / LAUNCH_DIR
    launch.mkdir(parents=True, exist_ok=True)
    update: dict[str, object] = {}
    if model is not None:
        update["model"] = model
    if subspace is not None:
        sub_dir = subspace.save(launch / "subspace")
        update["ablation"] = cfg.ablation.model_copy(update={"subspace": str(sub_dir), "random": None})
    job_cfg = cfg.model_copy(update=update)
    cfg_path = launch / "train.yaml"
    cfg_path.write_text(config_to_yaml(job_cfg), encoding="utf-8")
    if not _finished(job_cfg, out):
        run_job(cfg_path, out, processes, fsdp)
    return train(job_cfg, out, resume=True)


def _finished(cfg: TrainConfig, out: Path) -> bool:
    """Whether `out` holds this very run, finished (then no job is started; `train` returns it)."""
    from caft.training.runstate import fingerprint_changes, recorded_fingerprint, training_fingerprint

    recorded = recorded_fingerprint(out)
    if recorded is None or cfg.model is None:
        return False
    return not fingerprint_changes(recorded, training_fingerprint(cfg, cfg.model, None))


def run_job(cfg_path: Path, out: Path, processes: int, fsdp: bool) -> None:
    """torchrun with `processes` ranks of `python -m caft.training.launch cfg_path out`; its output goes to
    `out/launch/job.log`."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "caft.training.launch",
        str(cfg_path),
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, set here so it is not warned about
    if fsdp:
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    log_path = out / LAUNCH_DIR / "job.log"
    with open(log_path, "ab") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log_path.read_bytes()[-OUTPUT_TAIL:].decode("utf-8", errors="replace")
        raise TrainingLaunchError(
            f"the {processes}-process fine-tune in {out} failed (exit {done.returncode}); its output is in "
            f"{log_path}. The checkpoints written so far are kept: rerun to resume. Last lines:\n{tail}"
        )


def main(argv: list[str] | None = None) -> int:
    """One rank of a launched fine-tune: `python -m caft.training.launch CONFIG OUT`."""
    from caft.config import load_config
    from caft.training.config import TrainConfig
    from caft.training.trainer import train

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.stderr.write("usage: python -m caft.training.launch TRAIN_CONFIG.yaml OUT_DIR\n")
        return 2
    train(load_config(args[0], TrainConfig), args[1], resume=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
