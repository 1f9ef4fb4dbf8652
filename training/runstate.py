"""The training run directory: which run it holds, and whether that run is the one a call asks for.

A run is identified by its fingerprint: the training settings that change the numbers, the base model
(and adapter), digests of the data files, the subspace and the steering vectors, and the ablation mode.
It goes into every checkpoint and into `caft_training.json`, so

* resuming a partial run needs the same fingerprint (else the checkpoint belongs to another run);
* a finished run is returned as done only when its fingerprint matches; a different one is an error that
  names what changed (a pipeline clears the stage folder before it retrains).

    fp = training_fingerprint(cfg, model_cfg, subspace)
    fingerprint_changes(recorded_fingerprint(out_dir), fp)   # [] when the finished run is this one
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.errors import ConfigError, RunDirError, SubspaceError
from caft.rundir import FINAL_DIR, atomic_write_text, read_jsonl
from caft.training.checkpoint import CheckpointState, list_checkpoints

if TYPE_CHECKING:
    from caft.config import ModelConfig
    from caft.subspace import Subspace
    from caft.training.config import TrainConfig

log = logging.getLogger(__name__)

RECORD_FILE = "caft_training.json"
LOG_FILE = "train_log.jsonl"
MEANS_FILE = "ablation_means.safetensors"
__all__ = [
    "FINAL_DIR",
    "LOG_FILE",
    "MEANS_FILE",
    "RECORD_FILE",
    "RunState",
    "file_digest",
    "fingerprint_changes",
    "open_run",
    "recorded_fingerprint",
    "training_fingerprint",
]

# settings that do not change the numbers, so a resumed run may differ in them
RESUME_FREE = frozenset(
    {"progress", "keep_checkpoints", "log_every", "eval_every", "eval_batches", "save_every"}
)
# file paths: their contents are fingerprinted instead, so a moved file is still the same run
_PATH_FIELDS = {"data": {"path", "eval_path"}, "ablation": {"subspace", "steer_vectors"}}


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes (None for no path or a missing file: `prepare` reports those)."""
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def training_fingerprint(
    cfg: TrainConfig, model: ModelConfig | None = None, subspace: Subspace | None = None
) -> dict[str, Any]:
    """What identifies the run `train(cfg, model=model, subspace=subspace)` would produce. Cheap: reads the
    data files and the subspace, loads no model."""
    mcfg = model or cfg.model
    if mcfg is None:
        raise ConfigError("no model to fine-tune: pass --base-model (or set model.name_or_path)")
    config = cfg.model_dump(mode="json", exclude={*RESUME_FREE, "model"})
    for section, fields in _PATH_FIELDS.items():
        for name in fields:
            config[section].pop(name, None)
    sub = subspace
    if sub is None and cfg.ablation.subspace is not None:
        from caft.subspace import Subspace

        try:
            sub = Subspace.load(cfg.ablation.subspace)
        except SubspaceError:
            sub = None  # `prepare` raises the error with the model's shape in it
    ablates = sub is not None or cfg.ablation.random is not None
    return {
        "config": config,
        "model": mcfg.model_dump(mode="json", exclude={"device"}),
        "data": {"train": file_digest(cfg.data.path), "eval": file_digest(cfg.data.eval_path)},
        "subspace_digest": sub.digest() if sub is not None else None,
        "steer_vectors_digest": file_digest(cfg.ablation.steer_vectors),
        "ablation_mode": cfg.ablation.mode if ablates else None,
    }


def recorded_fingerprint(out_dir: str | Path) -> dict[str, Any] | None:
    """The fingerprint of the finished run in `out_dir` (None: no finished run, or one recorded without a
    fingerprint by an older caft)."""
    path = Path(out_dir) / RECORD_FILE
    if not path.is_file() or not (Path(out_dir) / FINAL_DIR).is_dir():
        return None
    fp = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
    return fp if isinstance(fp, dict) else None


def fingerprint_changes(recorded: Any, current: dict[str, Any], limit: int = 8) -> list[str]:
    """Dotted names of the entries that differ (`config.optim.lr`, `subspace_digest`, ...); ["fingerprint"]
    when nothing (or an older caft's fingerprint) was recorded."""
    if not isinstance(recorded, dict):
        return ["fingerprint"]
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        elif a != b:
            out.append(where)

    walk(recorded, current, "")
    return out[:limit]


@dataclass
class RunState:
    """Where a call starts: the finished record (nothing to do), or a step and the checkpoint to load."""

    start_step: int = 0
    checkpoint: CheckpointState | None = None
    finished: dict[str, Any] | None = None


def open_run(out: Path, resume: bool, fingerprint: dict[str, Any]) -> RunState:
    """Check `out` against this call and find where to start; nothing is overwritten without `resume`."""
    record_path, log_path = out / RECORD_FILE, out / LOG_FILE
    if record_path.is_file() and (out / FINAL_DIR).is_dir():
        if not resume:
            raise RunDirError(f"{out} already holds a finished training run; choose another --out")
        changes = fingerprint_changes(recorded_fingerprint(out), fingerprint)
        if changes:
            raise RunDirError(
                f"{out} holds a finished training run made with different inputs ({_changed(changes)}); "
                f"it is not this run. Delete {out} to retrain, or choose another --out"
            )
        log.info("%s already holds this finished run; nothing to do", out)
        return RunState(finished=json.loads(record_path.read_text(encoding="utf-8")))
    checkpoints = list_checkpoints(out)
    if not resume:
        if checkpoints or log_path.exists():
            raise RunDirError(
                f"{out} already holds a partial training run; pass --resume to continue it, or choose another --out"
            )
        return RunState()
    state = RunState()
    if checkpoints:
        ckpt = checkpoints[-1]
        changes = fingerprint_changes(ckpt.info.get("fingerprint"), fingerprint)
        if changes:
            raise RunDirError(
                f"{ckpt.path} was written with a different configuration, model or subspace "
                f"({_changed(changes)}); resuming needs the same settings (only "
                f"{', '.join(sorted(RESUME_FREE))} and model.device may change): restore them, or start a new "
                "--out directory"
            )
        state = RunState(start_step=ckpt.step, checkpoint=ckpt)
        log.info("resuming %s at step %d", out, ckpt.step)
    else:
        log.info("no checkpoint in %s: starting from step 0", out)
    cut_log(log_path, state.start_step)
    return state


def _changed(changes: list[str]) -> str:
    if changes == ["fingerprint"]:
        return "no fingerprint was recorded"
    return "changed: " + ", ".join(changes)


def cut_log(log_path: Path, step: int) -> None:
    """Drop log records past the checkpoint we resume from (they will be written again)."""
    if not log_path.exists():
        return
    keep = [r for r in read_jsonl(log_path) if int(r.get("step", 0)) <= step and r.get("event") != "stopped"]
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in keep))
