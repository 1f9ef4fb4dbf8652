"""Encoders of the dictionary_learning SAE classes, for loading their `ae.pt` checkpoints.

The state-dict key names are those the dictionary_learning classes save. They are re-implemented here
because the package pins an old nnsight that conflicts with the one caft uses; only encoding and the
decoder directions are needed.
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import nn


class DLStandard(nn.Module):
    """`AutoEncoder`: relu(encoder(x - bias))."""

    keys: ClassVar[tuple[str, ...]] = ("bias", "encoder.weight", "encoder.bias", "decoder.weight")

    def __init__(self, d_in: int, d_sae: int, _k: int | None = None) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d_in))
        self.encoder = nn.Linear(d_in, d_sae)
        self.decoder = nn.Linear(d_sae, d_in, bias=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x - self.bias))

    def w_dec(self) -> torch.Tensor:
        return self.decoder.weight.T  # (d_sae, d_in)


class DLTopK(nn.Module):
    """`AutoEncoderTopK`: keep the k largest of relu(encoder(x - b_dec)) per token."""

    keys: ClassVar[tuple[str, ...]] = (
        "encoder.weight",
        "encoder.bias",
        "decoder.weight",
        "b_dec",
        "k",
        "threshold",
    )

    def __init__(self, d_in: int, d_sae: int, k: int | None = None) -> None:
        super().__init__()
        self.encoder = nn.Linear(d_in, d_sae)
        self.decoder = nn.Linear(d_sae, d_in, bias=False)
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("k", torch.tensor(int(k or 1), dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x - self.b_dec))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.pre(x)
        k = min(int(cast(torch.Tensor, self.k)), acts.shape[-1])
        top = acts.topk(k, dim=-1)
        return torch.zeros_like(acts).scatter_(-1, top.indices, top.values)

    def w_dec(self) -> torch.Tensor:
        return self.decoder.weight.T


class DLBatchTopK(DLTopK):
    """`BatchTopKSAE`: at inference, latents above the learned threshold (batch top-k if none was learned)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.pre(x)
        thr = float(cast(torch.Tensor, self.threshold))
        if thr >= 0:
            return acts * (acts > thr)
        flat = acts.flatten()
        n = min(int(cast(torch.Tensor, self.k)) * acts.shape[0], flat.numel())
        top = flat.topk(n)
        return torch.zeros_like(flat).scatter_(-1, top.indices, top.values).reshape(acts.shape)


class DLJumpReLU(nn.Module):
    """`JumpReluAutoEncoder`: relu(pre * (pre > threshold)) scaled by decoder row norms."""

    keys: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

    def __init__(self, d_in: int, d_sae: int, _k: int | None = None) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold = nn.Parameter(torch.zeros(d_sae))
        self.apply_b_dec_to_input = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        return torch.relu(pre * (pre > self.threshold)) * self.W_dec.norm(dim=1)

    def w_dec(self) -> torch.Tensor:
        return self.W_dec


# our kind names -> encoder class
DL_KINDS: dict[str, type[DLStandard] | type[DLTopK] | type[DLJumpReLU]] = {
    "standard": DLStandard,
    "topk": DLTopK,
    "batchtopk": DLBatchTopK,
    "jumprelu": DLJumpReLU,
}

# dict_class / trainer_class names in dictionary_learning configs -> our kind names
DL_CLASSES = {
    "AutoEncoder": "standard",
    "StandardTrainer": "standard",
    "StandardTrainerAprilUpdate": "standard",
    "AutoEncoderTopK": "topk",
    "TopKTrainer": "topk",
    "TrainerTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "BatchTopKTrainer": "batchtopk",
    "JumpReluAutoEncoder": "jumprelu",
    "JumpReLUSAE": "jumprelu",
    "JumpReluTrainer": "jumprelu",
}
