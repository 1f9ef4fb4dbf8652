"""Gradient checkpointing with LoRA and CAFT: every layer is recomputed in backward while the ablation stays in
effect (transformers checkpoints a layer's `forward`, so the ablation hook on the layer's output sits outside
the recomputed region: it runs once, its backward is kept, and the next layer's recomputation starts from the
ablated output saved at the boundary); the weights equal those of the run without checkpointing, and the LoRA
weights really change."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import train_helpers
from safetensors.torch import load_file
from train_helpers import CHAT, jsonl, train_cfg

from caft.training import ablation as ablation_mod
from caft.training.trainer import train

llama_dir = train_helpers.llama_dir


def counted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts ProjectAblation.apply calls per layer, and forwards of the llama MLPs (recomputation included)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls: Counter[str] = Counter()
    apply, mlp_forward = ablation_mod.ProjectAblation.apply, LlamaMLP.forward

    def counted_apply(self: Any, h: torch.Tensor, layer: int) -> torch.Tensor:
        calls[f"ablate{layer}"] += 1
        return apply(self, h, layer)

    def counted_mlp(self: Any, x: torch.Tensor) -> torch.Tensor:
        calls["mlp"] += 1
        return mlp_forward(self, x)

    monkeypatch.setattr(ablation_mod.ProjectAblation, "apply", counted_apply)
    monkeypatch.setattr(LlamaMLP, "forward", counted_mlp)
    return calls


def test_ablation_holds_under_recomputation_and_lora_learns(
    tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = jsonl(tmp_path / "d.jsonl", CHAT)
    steps = 3
    common: dict[str, Any] = {"ablation": {"random": "1:4,2:4", "mode": "project"}}
    calls = counted(monkeypatch)
    plain = train(train_cfg(llama_dir, data, optim={"max_steps": steps}, **common), tmp_path / "plain")
    plain_calls = dict(calls)
    calls.clear()
    cfg = train_cfg(llama_dir, data, optim={"max_steps": steps, "gradient_checkpointing": True}, **common)
    ckpt = train(cfg, tmp_path / "ckpt")
    # checkpointing recomputes every layer (3 layers) in backward; the ablation runs once per forward
    assert plain_calls == {"ablate1": steps, "ablate2": steps, "mlp": 3 * steps}
    assert dict(calls) == {"ablate1": steps, "ablate2": steps, "mlp": 2 * 3 * steps}
    a = load_file(str(plain.final_path / "adapter_model.safetensors"))
    b = load_file(str(ckpt.final_path / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    lora_b = [v for k, v in b.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().sum()) > 0 for v in lora_b)  # B starts at zero: it was trained
    layers = ckpt.model.base_model.model.model.layers
    assert all(not m._forward_hooks for m in layers.modules())  # the ablation hooks came off
