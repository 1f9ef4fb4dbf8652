"""The baselines stage of `caft run` and what the eval stage needs from it: control fine-tunes (random and
top-k subspaces at matched counts, preventative steering, the soft penalty sweep), the checkpoint sweep of the
plain fine-tune, the model of each baseline row, and each row's task metric (held-out loss)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.config import ModelConfig
from caft.errors import ConfigError, RunDirError
from caft.rundir import FINAL_DIR, SUBSPACE_DIR

if TYPE_CHECKING:
    from caft.app.stages import RunContext
    from caft.subspace import Subspace

log = logging.getLogger(__name__)


def _train_cfg(ctx: RunContext) -> Any:
    from caft.app.stages import _train_cfg as train_cfg

    return train_cfg(ctx)


BASELINES_DIR = "baselines"


def model_n_layers(model: ModelConfig) -> int:
    """Transformer blocks of `model`, read from its config (no weights loaded)."""
    from caft.models import load_model_config

    config = load_model_config(model.name_or_path)
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        n = getattr(getattr(config, "text_config", None), "num_hidden_layers", None)
    if n is None:
        raise ConfigError(f"{model.name_or_path}: its config names no num_hidden_layers")
    return int(n)


def _topk_subspace(diff_dir: Path, counts: dict[int, int], d_model: int, n_layers: int) -> Subspace:
    """The top PCs by explained variance at each layer, as many as `counts` gives there (fewer where the
    diff stage has fewer)."""
    import torch

    from caft.interp.schema import load_candidates, load_directions
    from caft.subspace import Column, Subspace

    cands = [c for c in load_candidates(diff_dir) if c.kind == "pc"]
    dirs = load_directions(diff_dir)
    vecs: dict[int, torch.Tensor] = {}
    prov: dict[int, list[Column]] = {}
    for L, k in counts.items():
        layer = sorted((c for c in cands if c.layer == L), key=lambda c: c.index)[:k]
        if layer:
            vecs[L] = torch.stack([dirs[c.id] for c in layer])
            prov[L] = [Column(candidate=c.id, label="top PC") for c in layer]
    return Subspace.from_vectors(vecs, d_model=d_model, provenance=prov, n_layers=n_layers)


def baseline_subspace(
    ctx: RunContext, name: str, counts: dict[int, int], d_model: int, n_layers: int
) -> Subspace:
    """The subspace of baseline `name` with the given directions per layer."""
    if name == "random":
        from caft.training.ablation import random_subspace

        return random_subspace(counts, d_model, seed=ctx.cfg.seed, n_layers=n_layers)
    if name == "topk":
        return _topk_subspace(ctx.path / "diff", counts, d_model, n_layers)
    raise ConfigError(f"unknown baseline {name!r}; the baselines are random and topk")


def _clear_stale(folder: Path, sub: Subspace) -> None:
    """A training folder left by another subspace (the selection changed since) is removed, so that
    `train(resume=True)` does not return the old model."""
    import shutil

    from caft.training.trainer import RECORD_FILE

    record = folder / RECORD_FILE
    if record.is_file():
        digest = json.loads(record.read_text(encoding="utf-8")).get("subspace_digest")
        if digest != sub.digest():
            log.warning("%s was trained with another subspace: training it again", folder)
            shutil.rmtree(folder)


def _mode_cfg(ctx: RunContext, **ablation: Any) -> Any:
    """The `caft` stage's training config with other ablation settings (the steering and penalty runs)."""
    tc = _train_cfg(ctx)
    return tc.model_copy(update={"ablation": tc.ablation.model_copy(update=ablation)})


def _train_baseline(ctx: RunContext, name: str, sub: Subspace, counts: dict[int, int]) -> dict[str, Any]:
    """Train baseline `name` (not `steps`) into baselines/<name>/."""
    from caft.app.run_config import penalty_name, steer_name

    b = ctx.cfg.baselines
    folder = ctx.path / BASELINES_DIR / name
    tc = _train_cfg(ctx)
    steer = {steer_name(c): c for c in b.steer}
    penalty = {penalty_name(c): c for c in b.penalty}
    if name in steer:
        run_sub, tc = sub, _mode_cfg(ctx, mode="steer", steer_coef=steer[name])
    elif name in penalty:
        tc = _mode_cfg(ctx, mode="penalty", penalty_coef=penalty[name], penalty_quantile=b.penalty_quantile)
        run_sub = sub
    else:
        n_layers = sub.n_layers or model_n_layers(ctx.cfg.model)
        run_sub = baseline_subspace(ctx, name, counts, sub.d_model, n_layers)
    _clear_stale(folder, run_sub)
    run_sub.save(folder / SUBSPACE_DIR)
    res = ctx.fine_tune(tc, folder, subspace=run_sub)
    return {
        "final": str(res.final_path),
        "metrics": res.metrics,
        "subspace_dims": run_sub.total_dims,
        "mode": tc.ablation.mode,
        "models": {name: f"{BASELINES_DIR}/{name}"},
    }


def _steps_baseline(ctx: RunContext) -> dict[str, Any]:
    """The plain fine-tune again (the train stage's config and seed), checkpointed for the sweep; each
    checkpoint becomes a model `steps@N`. The checkpoint whose held-out loss is nearest the CAFT model's is
    named (`matched_to_caft`), the early-stopping point at matched task metric."""
    from caft.training.sweep import export_checkpoints, sweep_config

    folder = ctx.path / BASELINES_DIR / "steps"
    tc = sweep_config(_train_cfg(ctx), ctx.cfg.baselines.steps)
    res = ctx.fine_tune(tc, folder)
    points = export_checkpoints(tc, ctx.cfg.model, folder)
    models = {f"steps@{p['step']}": f"{BASELINES_DIR}/steps/step-{p['step']:06d}" for p in points}
    info: dict[str, Any] = {
        "final": str(res.final_path),
        "metrics": res.metrics,
        "every": tc.save_every,
        "checkpoints": points,
        "models": models,
    }
    caft_loss = _eval_loss(ctx.path / "caft")
    scored = [p for p in points if p["eval_loss"] is not None]
    if caft_loss is not None and scored:
        best = min(scored, key=lambda p: abs(p["eval_loss"] - caft_loss))
        info["matched_to_caft"] = {"row": f"steps@{best['step']}", "caft_eval_loss": caft_loss, **best}
    else:
        info["note"] = (
            "no held-out loss to match the checkpoints to CAFT's: set train.data.eval_fraction or eval_path"
        )
    return info


def _eval_loss(folder: Path) -> float | None:
    from caft.training.trainer import RECORD_FILE

    record = folder / RECORD_FILE
    if not record.is_file():
        return None
    value = json.loads(record.read_text(encoding="utf-8")).get("metrics", {}).get("eval_loss")
    return None if value is None else float(value)


def stage_baselines(ctx: RunContext) -> dict[str, Any]:
    """Fine-tune once per enabled baseline (`baselines.*`): the subspace baselines ablate a control subspace
    with the triage subspace's count per layer, the steering and penalty runs use the triage subspace with
    their mode, all with the `caft` stage's training config and seed; `steps` sweeps the plain fine-tune's
    checkpoints."""
    from caft.subspace import Subspace

    names = ctx.cfg.baselines.enabled
    if not names:
        return {
            "ran": [],
            "note": "no baseline enabled (baselines.random, topk, steer, penalty, steps)",
        }
    info: dict[str, Any] = {"ran": [], "models": {}}
    need_sub = [n for n in names if n != "steps"]
    sub: Subspace | None = None
    counts: dict[int, int] = {}
    if need_sub:
        sub_dir = ctx.final_subspace_dir()
        if not sub_dir.is_dir():
            raise RunDirError(f"{sub_dir} does not exist: run the triage stage first")
        sub = Subspace.load(sub_dir)
        if sub.is_empty:
            info["note"] = "the triage selected no directions: no count per layer to match, baselines skipped"
            info["skipped"] = need_sub
            log.warning(info["note"])
        counts = {L: int(sub.bases[L].shape[1]) for L in sub.layers}
        info["counts"] = {str(L): k for L, k in counts.items()}
    for name in names:
        if name == "steps":
            res = _steps_baseline(ctx)
        elif sub is not None and not sub.is_empty:
            res = _train_baseline(ctx, name, sub, counts)
        else:
            continue
        info["models"].update(res.pop("models"))
        info["ran"].append(name)
        info[name] = res
    return info


def baseline_models(ctx: RunContext) -> list[tuple[str, str]]:
    """(row, training folder) of every baseline model the baselines stage finished (in this config's
    order; the steps sweep's checkpoints in step order)."""
    marker = ctx.run.stage(BASELINES_DIR).marker()
    info = (marker or {}).get("info", {})
    ran = info.get("ran", [])
    models: dict[str, str] = info.get("models") or {n: f"{BASELINES_DIR}/{n}" for n in ran}
    rows: list[tuple[str, str]] = []
    for n in ctx.cfg.baselines.enabled:
        if n not in ran:
            continue
        mine = [(r, f) for r, f in models.items() if r == n or (n == "steps" and r.startswith("steps@"))]
        rows += [(r, f) for r, f in mine if (ctx.path / f / FINAL_DIR).is_dir()]
    return rows


def task_metric(ctx: RunContext, row: str) -> dict[str, Any] | None:
    """The held-out loss of a row's training run (the task metric of a chat run's trade-off plot), or None
    (the base model, an external fine-tune, a run without held-out data)."""
    from caft.training.sweep import CHECKPOINT_RECORD

    folders = dict(baseline_models(ctx))
    if row == "ft" and ctx.cfg.finetuned is None:
        folder = ctx.path / "train"
    elif row == "caft":
        folder = ctx.path / "caft"
    elif row in folders:
        folder = ctx.path / folders[row]
    else:
        return None
    value = _eval_loss(folder)
    if value is None and (folder / CHECKPOINT_RECORD).is_file():
        value = json.loads((folder / CHECKPOINT_RECORD).read_text(encoding="utf-8")).get("eval_loss")
    if value is None:
        return None
    return {"metric": "held-out loss", "value": float(value), "lower_is_better": True, "source": str(folder)}
