"""The fewer-steps baseline: a plain fine-tune whose intermediate checkpoints are each turned into a model.

Early stopping alone removes emergent misalignment in many models while keeping most of the task performance
("Overtrained, Not Misaligned"), so a fair CAFT comparison evaluates the plain fine-tune at fewer steps too.
`sweep_config` sets the checkpoint interval so that about `n` checkpoints fall before the last step (and the
held-out loss is measured at each); `export_checkpoints` writes each checkpoint as a `final/` folder (a peft
adapter or a full model, as the trainer's own output) that any eval loads like a finished run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from caft.config import ModelConfig
from caft.errors import RunDirError
from caft.training.checkpoint import PARAMS_FILE, list_checkpoints
from caft.training.config import TrainConfig
from caft.training.runstate import FINAL_DIR, LOG_FILE

CHECKPOINT_RECORD = "checkpoint.json"


def planned_steps(cfg: TrainConfig) -> int:
    """Optimizer steps `train(cfg)` will take, from the training rows as read (before tokenization)."""
    from caft.training.setup import read_examples

    if cfg.optim.max_steps is not None:
        return cfg.optim.max_steps
    rows, _, _ = read_examples(cfg)
    micro_per_epoch = math.ceil(len(rows) / cfg.optim.batch_size)
    return max(1, math.ceil(cfg.optim.epochs * micro_per_epoch / cfg.optim.grad_accum))


def sweep_config(cfg: TrainConfig, n: int) -> TrainConfig:
    """`cfg` with a checkpoint (and a held-out evaluation) every ceil(total / (n + 1)) steps, all kept: at
    most `n` checkpoints before the last step."""
    if n < 1:
        raise ValueError(f"a checkpoint sweep needs n >= 1, got {n}")
    every = max(1, math.ceil(planned_steps(cfg) / (n + 1)))
    return cfg.model_copy(update={"save_every": every, "eval_every": every, "keep_checkpoints": n + 1})


def held_out_losses(run_dir: Path) -> dict[int, float]:
    """The held-out loss at each evaluated step of a run (empty without held-out data)."""
    log = run_dir / LOG_FILE
    out: dict[int, float] = {}
    if not log.is_file():
        return out
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if rec.get("event") == "eval" and rec.get("eval_loss") is not None:
            out[int(rec["step"])] = float(rec["eval_loss"])
    return out


def export_checkpoints(cfg: TrainConfig, model: ModelConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Every checkpoint of the finished run in `run_dir` as `run_dir/step-NNNNNN/final` (kept when already
    there), with its step and held-out loss in `step-NNNNNN/checkpoint.json`; oldest first."""
    import torch
    from safetensors.torch import load_file

    from caft.training.output import save_final
    from caft.training.setup import prepare

    ckpts = list_checkpoints(run_dir)
    if not (run_dir / FINAL_DIR).is_dir():
        raise RunDirError(f"{run_dir} holds no finished run: train it before exporting its checkpoints")
    losses = held_out_losses(run_dir)
    out: list[dict[str, Any]] = []
    prep: Any = None
    for ck in ckpts:
        folder = run_dir / ck.path.name
        info = {"step": ck.step, "eval_loss": losses.get(ck.step), "final": str(folder / FINAL_DIR)}
        if not (folder / FINAL_DIR).is_dir():
            if prep is None:
                prep = prepare(cfg, model)
            saved = load_file(str(ck.path / PARAMS_FILE))
            params = dict(prep.model.named_parameters())
            unknown = [name for name in saved if name not in params]
            if unknown:
                raise RunDirError(f"checkpoint {ck.path} does not fit the model (unexpected {unknown[:3]})")
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor)
            save_final(prep, folder)
            (folder / CHECKPOINT_RECORD).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        out.append(info)
    return out
