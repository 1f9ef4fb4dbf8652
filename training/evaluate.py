"""The held-out evaluation inside a training run: mean loss under the training-time ablation and, for the
classification objectives, accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from caft.training.data import Tokenized, collate

if TYPE_CHECKING:
    from caft.training.config import TrainConfig
    from caft.training.objectives import ObjectiveLoss
    from caft.training.setup import Prepared

__all__ = ["evaluate"]


def evaluate(
    cfg: TrainConfig, prep: Prepared, objective: ObjectiveLoss, forward: Callable[[Any], Any]
) -> dict[str, Any]:
    """Mean held-out loss (with the training-time ablation, through `forward`) and, for classification,
    accuracy; `eval_batches` caps the batches. The model is back in train mode afterwards."""
    items: list[Tokenized] = prep.held_out
    bs = cfg.optim.batch_size
    pad_id = int(prep.tokenizer.pad_token_id)
    batches = [items[i : i + bs] for i in range(0, len(items), bs)]
    if cfg.eval_batches is not None:
        batches = batches[: cfg.eval_batches]
    prep.model.eval()
    total, weight, correct, n = 0.0, 0, 0, 0
    try:
        with torch.no_grad():
            for chunk in batches:
                batch = collate(chunk, pad_id)
                output = forward(batch)
                w = int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else len(chunk)
                total += float(objective.loss(output, batch)) * w
                weight += w
                correct += objective.correct(output, batch)
                n += len(chunk)
    finally:
        prep.model.train()
    out: dict[str, Any] = {"eval_loss": total / max(weight, 1)}
    if cfg.objective != "chat":
        out["eval_accuracy"] = correct / max(n, 1)
    return out
