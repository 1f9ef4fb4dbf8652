"""What a finished run leaves: `final/` (the adapter or model, loadable without caft) and the record
`caft_training.json` that describes it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.env import package_versions, scrub_obj
from caft.training.ablation import Ablation, SteerAblation
from caft.training.classifier import EncoderClassifier
from caft.training.runstate import FINAL_DIR, MEANS_FILE

if TYPE_CHECKING:
    import torch

    from caft.config import ModelConfig
    from caft.training.config import TrainConfig
    from caft.training.setup import Prepared

__all__ = ["run_record", "save_final"]


def save_final(prep: Prepared, out: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter (LoRA) or the full model, plus the tokenizer, into `out/final` atomically. `state`:
    the whole tensors to write instead of the model's own (a sharded model's, from
    `caft.training.sharded.final_state`); the files are the same as one process writes."""
    final, tmp = out / FINAL_DIR, out / f".{FINAL_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model: Any = prep.model
    model.eval()
    if isinstance(model, EncoderClassifier):
        model.save(tmp, prep.tokenizer)
    else:
        model.save_pretrained(tmp, **({} if state is None else {"state_dict": state}))
        prep.tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _uses_means(abl: Ablation) -> bool:
    return abl.mode == "mean" or (isinstance(abl, SteerAblation) and abl.source == "mean_projection")


def run_record(
    cfg: TrainConfig,
    mcfg: ModelConfig,
    prep: Prepared,
    abl: Ablation | None,
    metrics: dict[str, Any],
    total_steps: int,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    """The contents of `caft_training.json` (scrubbed of secrets)."""
    sub = prep.subspace
    return scrub_obj(
        {
            "format": "caft.training/1",
            "base_model": mcfg.name_or_path,
            "objective": cfg.objective,
            "method": cfg.method,
            "output": "peft_adapter"
            if cfg.method == "lora"
            else ("encoder_classifier" if cfg.objective == "encoder_classifier" else "full_model"),
            "ablation": None
            if abl is None
            else {
                **abl.describe(),
                "subspace_digest": sub.digest() if sub is not None else None,
                "means_file": MEANS_FILE if _uses_means(abl) else None,
            },
            "subspace_digest": sub.digest() if sub is not None else None,
            "label_names": prep.label_names,
            "letter_token_ids": prep.letter_ids,
            "steps": total_steps,
            "data": prep.data_report,
            "metrics": metrics,
            "fingerprint": fingerprint,
            "config": cfg.model_dump(mode="json"),
            "model": mcfg.model_dump(mode="json"),
            "versions": package_versions(),
        }
    )
