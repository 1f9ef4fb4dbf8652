"""A small sae-lens SAE trained on base + fine-tuned activations, for models with no published SAE.

Activations are scaled to mean norm sqrt(d) first (the scale is saved in `caft_sae.json` and applied by
`LoadedSAE.encode`). sae-lens is imported inside `train_sae` (it takes seconds to import).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from caft.errors import DataError
from caft.interp.collect import collect_diffs
from caft.interp.config import SAETrainConfig
from caft.interp.inputs import TokenBatch
from caft.interp.sae_load import LoadedSAE, load_sae_lens_dir
from caft.interp.source import ActivationSource
from caft.rundir import atomic_write_json


def collect_training_acts(
    source: ActivationSource, batches: Sequence[TokenBatch], layers: list[int], max_tokens: int
) -> dict[int, torch.Tensor]:
    """Base and fine-tuned activations (together) at `layers`, at most `max_tokens` rows per layer."""
    if not layers:
        return {}
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    n = 0
    for db in collect_diffs(source, batches, layers):
        for layer in layers:
            b = db.base[layer]
            parts[layer] += [b.cpu(), (b + db.diffs[layer]).cpu()]
        n += 2 * db.n_tokens
        if n >= max_tokens:
            break
    return {layer: torch.cat(parts[layer])[:max_tokens] for layer in layers}


def train_sae(acts: torch.Tensor, cfg: SAETrainConfig, out_dir: Path, layer: int, name: str) -> LoadedSAE:
    """Train an sae-lens SAE on (N, d) activations and save it (sae-lens folder + caft_sae.json)."""
    from sae_lens import (
        SAETrainer,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig

    os.environ.setdefault("WANDB_MODE", "disabled")
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise DataError(f"no activations to train the layer-{layer} SAE on")
    if not bool(torch.isfinite(acts).all()):
        raise DataError(f"non-finite activations at layer {layer}; cannot train an SAE on them")
    d = int(acts.shape[1])
    mean_norm = float(acts.norm(dim=1).mean())
    scale = math.sqrt(d) / mean_norm if mean_norm > 0 else 1.0
    data = (acts * scale).float()
    device = str(acts.device)
    torch.manual_seed(cfg.seed)
    d_sae = cfg.expansion * d
    sae: Any
    if cfg.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=d_sae, k=min(cfg.k, d_sae), device=device))
    else:
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(d_in=d, d_sae=d_sae, l1_coefficient=cfg.l1_coefficient, device=device)
        )
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def provider() -> Iterator[torch.Tensor]:
        while True:
            perm = torch.randperm(data.shape[0], generator=gen)
            for start in range(0, data.shape[0] - cfg.batch_size + 1, cfg.batch_size):
                yield data[perm[start : start + cfg.batch_size].to(data.device)]
            if data.shape[0] < cfg.batch_size:
                yield data

    batch = min(cfg.batch_size, int(data.shape[0]))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=max(cfg.training_tokens, batch),
        train_batch_size_samples=batch,
        lr=cfg.lr,
        lr_end=cfg.lr,
        device=device,
        n_checkpoints=0,
    )
    trainer = SAETrainer(trainer_cfg, sae, provider())
    trained = trainer.fit()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    trained.save_inference_model(tmp)
    atomic_write_json(tmp / "caft_sae.json", {"input_scale": scale, "layer": layer, "mean_norm": mean_norm})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # the folder appears complete or not at all
    return load_sae_lens_dir(out_dir, layer, name)
