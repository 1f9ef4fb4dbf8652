"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

A checkpoint is a directory `checkpoints/step-000120/`:

    trainable.safetensors   every parameter with requires_grad (LoRA tensors, or the whole model, + head)
    optimizer.pt            AdamW state
    scheduler.pt            LR scheduler state
    rng.pt                  torch CPU (+ CUDA) generator states, python `random`, numpy
    state.json              step, total steps, config fingerprint, subspace digest

It is written into a temporary sibling folder and renamed into place, so a folder named `step-*` is always
complete. Only the newest `keep` checkpoints stay on disk.

The files hold whole tensors whatever the training ran on: a sharded (FSDP) model's state is gathered to
rank 0 first (`checkpoint_state`, `caft.training.sharded`) and scattered back on load, so one process can
resume a sharded run's checkpoint and the reverse.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.errors import RunDirError
from caft.rundir import atomic_write_json

if TYPE_CHECKING:
    import torch
    from torch import nn

CKPT_DIR = "checkpoints"
STATE_FILE = "state.json"
PARAMS_FILE = "trainable.safetensors"


@dataclass
class CheckpointState:
    step: int
    path: Path
    info: dict[str, Any]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, main: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable parameters, optimizer state) as `save_checkpoint` writes them, on the rank that writes
    (`main`); empty elsewhere. Every rank calls it: for a sharded model it is a collective."""
    from caft.training.sharded import full_optimizer_state, full_trainable_state, is_sharded

    if is_sharded(model):
        return full_trainable_state(model), full_optimizer_state(model, optimizer)
    if not main:
        return {}, {}
    return trainable_state(model), optimizer.state_dict()


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path,
    step: int,
    state: tuple[dict[str, torch.Tensor], dict[str, Any]],
    scheduler: Any,
    info: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` from `state` (`checkpoint_state`'s answer) and the scheduler and RNG states."""
    import torch
    from safetensors.torch import save_file

    root = out_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    params, optimizer_state = state
    save_file(params, str(tmp / PARAMS_FILE))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    atomic_write_json(tmp / STATE_FILE, {"step": step, **info})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[CheckpointState]:
    """Complete checkpoints, oldest first."""
    root = out_dir / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if not d.is_dir() or not d.name.startswith("step-") or not (d / STATE_FILE).is_file():
            continue
        info = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
        found.append(CheckpointState(step=int(info["step"]), path=d, info=info))
    return sorted(found, key=lambda c: c.step)


def load_checkpoint(
    ckpt: CheckpointState, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> None:
    """Restore parameters, optimizer, scheduler and RNG states from `ckpt` (in place); a sharded model keeps
    its shard of the saved tensors (a collective then: every rank calls it)."""
    import torch
    from safetensors.torch import load_file

    from caft.training.sharded import is_sharded, load_full_state

    saved = load_file(str(ckpt.path / PARAMS_FILE))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in params]
    if missing or unknown:
        raise RunDirError(
            f"checkpoint {ckpt.path} does not fit this model (missing {missing[:3]}, unexpected {unknown[:3]}); "
            "it was written by a different configuration: start a new --out directory"
        )
    optimizer_state = torch.load(ckpt.path / "optimizer.pt", weights_only=True)
    if is_sharded(model):
        load_full_state(model, optimizer, saved, optimizer_state)
    else:
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(ckpt.path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(ckpt.path / "rng.pt", weights_only=False))
