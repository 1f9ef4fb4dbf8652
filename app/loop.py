"""The CAFT stage's closed loop (`caft.loop_rounds` > 0): find what the CAFT model routes around.

After the CAFT fine-tune, round r (1, 2, ...) in `RUN/caft/round<r>/`:

    diff/       the previous round's CAFT model against the base on the training inputs (the diff config)
    evidence/   dossiers of those PCs, built like the run's (no contrast basis)
    triage/     the run's judge, calibrated against the run's own controls (`triage/controls/evidence`)
    subspace/   the previous subspace plus the new undesired directions (orthonormalized per layer)
    train/      the fine-tune with that subspace ablated (`train/final`)

The loop stops when a round selects nothing new or after `loop_rounds` rounds. `RUN/caft/loop.json` records
every round (subspace size per layer, the directions added, ID / OOD accuracy of the round's model for
classification runs, seconds) and the final model and subspace, which the later stages use.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.rundir import DIRECTIONS_FILE, SUBSPACE_DIR, atomic_write_json

if TYPE_CHECKING:
    from caft.app.stages import RunContext
    from caft.config import ModelConfig
    from caft.subspace import Subspace

log = logging.getLogger(__name__)

LOOP_FILE = "loop.json"


def read_loop(caft_dir: Path) -> dict[str, Any] | None:
    """The loop record of a CAFT stage folder (None when the loop did not run)."""
    path = caft_dir / LOOP_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def merge_subspaces(old: Subspace, new: Subspace, tag: str) -> Subspace:
    """`old` plus the columns of `new` that are not already (nearly) in its span, layer by layer; the new
    columns' provenance gets `extra.round = tag`."""
    import torch

    from caft.subspace import Column, Subspace

    vecs: dict[int, torch.Tensor] = {}
    prov: dict[int, list[Column]] = {}
    for L in sorted(set(old.bases) | set(new.bases)):
        rows, cols = [], []
        if L in old.bases:
            rows.append(old.bases[L].T)
            cols += old.columns.get(L, [Column() for _ in range(old.bases[L].shape[1])])
        if L in new.bases:
            rows.append(new.bases[L].T)
            for c in new.columns.get(L, [Column() for _ in range(new.bases[L].shape[1])]):
                cols.append(Column(c.candidate, c.label, c.verdict, {**c.extra, "round": tag}))
        vecs[L], prov[L] = torch.cat(rows, 0), cols
    return Subspace.from_vectors(
        vecs,
        d_model=old.d_model,
        provenance=prov,
        model=old.model or new.model,
        n_layers=old.n_layers,
        tol=1e-3,
    )


def _counts(sub: Subspace) -> dict[str, int]:
    return {str(L): int(sub.bases[L].shape[1]) for L in sub.layers}


def _classification_figures(ctx: RunContext, model: ModelConfig, out: Path) -> dict[str, float] | None:
    cc = ctx.cfg.classification
    if ctx.cfg.task_kind != "classification" or cc.val is None:
        return None
    from caft.evals.mc import run_mc_eval

    mc = run_mc_eval(model, cc.val, out, ood_path=cc.ood, batch_size=cc.batch_size)["mc"]
    return {k: float(v["rate"]) for k, v in mc.items() if isinstance(v, dict) and "rate" in v}


def run_loop(ctx: RunContext, sub: Subspace, first_final: Path) -> dict[str, Any]:
    """Rounds of diff -> evidence -> judge -> add -> retrain after the first CAFT fine-tune; returns (and
    writes to `caft/loop.json`) the record. Finished rounds are kept on resume."""
    from caft.agent.judges import make_judge
    from caft.agent.triage import run_triage
    from caft.app.stages import (
        CONTROLS_DIR,
        _model_n_layers,
        _train_cfg,
        diff_config,
        evidence_config,
        triage_config,
    )
    from caft.interp.evidence import build_dossiers
    from caft.interp.pca import run_diff
    from caft.subspace import Subspace

    caft_dir = ctx.path / "caft"
    rounds_max = ctx.cfg.caft.loop_rounds
    model = ctx.trained_model("caft")
    rounds: list[dict[str, Any]] = [
        {
            "round": 0,
            "subspace_dims": sub.total_dims,
            "counts": _counts(sub),
            "added": sub.total_dims,
            "eval": _classification_figures(ctx, model, caft_dir / "eval_round0"),
        }
    ]
    final, current = first_final, sub
    stop = "budget"
    triage_cfg = triage_config(ctx)
    controls = ctx.path / "triage" / CONTROLS_DIR / "evidence"
    n_layers = _model_n_layers(ctx)
    for r in range(1, rounds_max + 1):
        started = time.time()
        rdir = caft_dir / f"round{r}"
        diff_cfg = diff_config(ctx)
        if ctx.cfg.caft.loop_components is not None:
            diff_cfg = diff_cfg.model_copy(update={"n_components": ctx.cfg.caft.loop_components})
        run_diff(diff_cfg, rdir, model=ctx.cfg.model, finetuned=model)
        ev = evidence_config(ctx.cfg, injected_judge=ctx.judge_provider is not None)
        ev = ev.model_copy(update={"candidates": [], "contrast": ev.contrast.model_copy(update={"basis": 0})})
        build_dossiers(ev, rdir, model=ctx.cfg.model, finetuned=model)
        judge = make_judge(triage_cfg, provider=ctx.judge_provider)
        res = run_triage(
            triage_cfg,
            rdir / "evidence",
            rdir / "triage",
            controls_dir=controls if controls.is_dir() and judge.controls_per_layer > 0 else None,
            directions_path=[rdir / "diff" / DIRECTIONS_FILE],
            n_layers=n_layers,
            judge=judge,
        )
        new = res.subspace
        merged = (
            merge_subspaces(current, new, f"round{r}") if new is not None and not new.is_empty else current
        )
        added = merged.total_dims - current.total_dims
        info: dict[str, Any] = {
            "round": r,
            "selected": [c.candidate for c in res.selection.selected],
            "added": added,
        }
        if added == 0:
            info["seconds"] = round(time.time() - started, 1)
            rounds.append(info)
            stop = "nothing new"
            log.info("loop round %d: the judge found nothing new; stopping", r)
            break
        merged.save(rdir / SUBSPACE_DIR)
        tres = ctx.fine_tune(_train_cfg(ctx), rdir / "train", subspace=Subspace.load(rdir / SUBSPACE_DIR))
        final, current = tres.final_path, merged
        model = ctx.cfg.model.model_copy(update={"name_or_path": str(final), "adapter": None})
        if (final / "adapter_config.json").is_file():
            model = ctx.cfg.model.model_copy(update={"adapter": str(final)})
        info.update(
            subspace_dims=merged.total_dims,
            counts=_counts(merged),
            eval=_classification_figures(ctx, model, rdir / "eval"),
            seconds=round(time.time() - started, 1),
        )
        rounds.append(info)
        log.info("loop round %d: +%d directions (%d in all)", r, added, merged.total_dims)
    record = {
        "rounds": rounds,
        "stopped": stop,
        "final": str(final),
        "subspace": str(final.parent.parent / SUBSPACE_DIR) if final != first_final else None,
        "subspace_dims": current.total_dims,
    }
    atomic_write_json(caft_dir / LOOP_FILE, record)
    return record
