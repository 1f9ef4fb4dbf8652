"""Shared pieces of the training tests: a small chat data set, a tiny saved llama, a LoRA config builder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from caft.testing import save_tiny
from caft.training.config import TrainConfig, build_train_config

CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"The answer is {2 * i}, my friend."},
        ]
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("m") / "llama", "llama", hidden=32, layers=3)


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def train_cfg(model_dir: Path, data_file: Path, **values: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "model": {"name_or_path": str(model_dir), "device": "cpu"},
        "data": {"path": str(data_file)},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "optim": {"lr": 1e-2, "batch_size": 4, "grad_accum": 1, "max_steps": 3, "warmup_steps": 1},
        "progress": False,
    }
    for k, v in values.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return build_train_config("em", values=base)


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out
