"""The ablation a run trains with, built from the config and the prepared model: the mode's steering
vectors, its reference means (modes `mean`, `steer` without vectors) or penalty reference (mode `penalty`),
computed once from the base model and kept next to the run so that a resumed run uses the same ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from caft.training.ablation import Ablation, make_ablation
from caft.training.data import batch_order, collate
from caft.training.means import compute_subspace_means, load_means, save_means
from caft.training.penalty import (
    DEFAULT_QUANTILE,
    PENALTY_FILE,
    load_reference,
    reference_magnitudes,
    save_reference,
)
from caft.training.runstate import MEANS_FILE
from caft.training.setup import Prepared, load_steer_vectors

if TYPE_CHECKING:
    import torch

    from caft.training.config import TrainConfig

__all__ = ["build_ablation", "reference_batches"]

_Tensors = dict[int, "torch.Tensor"]


def build_ablation(
    cfg: TrainConfig, prep: Prepared, out: Path, resume: bool, save: bool = True
) -> Ablation | None:
    """The configured ablation of `prep.subspace` (None: no subspace, or an empty one). Its references are
    read from `out` on `resume` when there, else computed; `save` writes them (rank 0 only)."""
    sub = prep.subspace
    if sub is None or sub.is_empty:
        return None
    vectors = None
    if cfg.ablation.steer_vectors is not None:
        vectors = load_steer_vectors(cfg.ablation.steer_vectors, prep.sites)
    means = None
    if cfg.ablation.mode == "mean" or (cfg.ablation.mode == "steer" and vectors is None):
        means = _kept(
            out / MEANS_FILE,
            resume,
            save,
            lambda: compute_subspace_means(prep.model, reference_batches(cfg, prep), sub),
            load_means,
            save_means,
        )
    reference = None
    if cfg.ablation.mode == "penalty":
        q = cfg.ablation.penalty_quantile
        reference = _kept(
            out / PENALTY_FILE,
            resume,
            save,
            lambda: reference_magnitudes(
                prep.model, reference_batches(cfg, prep), sub, DEFAULT_QUANTILE if q is None else q
            ),
            load_reference,
            save_reference,
        )
    return make_ablation(
        cfg.ablation.mode,
        sub,
        means=means,
        steer_coef=cfg.ablation.steer_coef,
        vectors=vectors,
        penalty_coef=cfg.ablation.penalty_coef,
        reference=reference,
    )


def _kept(
    path: Path,
    resume: bool,
    save: bool,
    compute: Callable[[], _Tensors],
    load: Callable[[Path], _Tensors],
    write: Callable[[Path, _Tensors], None],
) -> _Tensors:
    """A run's reference tensors: read from `path` when resuming, else computed (and written when `save`)."""
    if resume and path.is_file():
        return load(path)
    value = compute()
    if save:  # every rank computes the same values from the same batches; one writes them
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, value)
    return value


def reference_batches(cfg: TrainConfig, prep: Prepared) -> list[dict[str, torch.Tensor]]:
    """The batches the references come from (`ablation.mean_batches` of them, in a seeded order of their
    own), weighted by the tokens that are trained on."""
    pad_id = int(prep.tokenizer.pad_token_id)
    order = batch_order(len(prep.train), cfg.optim.batch_size, cfg.seed, epoch=-1)
    batches = []
    for idx in order[: cfg.ablation.mean_batches]:
        b = collate([prep.train[j] for j in idx], pad_id)
        if "labels" in b:
            b["loss_mask"] = (b["labels"] != -100).long()
        batches.append({k: v for k, v in b.items() if k not in ("target", "last_index")})
    return batches
