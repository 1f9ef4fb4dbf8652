"""The sixth mode, `penalty`: a soft one-sided penalty on the selected directions (in the spirit of BLOCK-EM).

The other modes edit activations or gradients. This one edits nothing: the forward is the fine-tune's own,
and a loss term discourages the fine-tune from pushing the subspace's coordinates beyond the magnitudes the
base model gives them. At a subspace layer L with orthonormal basis Q (d, k), a token's coordinates are
c = hQ (k,). Before training, the base model (the LoRA adapter is still zero) is run over
`ablation.mean_batches` training batches, and each direction j gets a reference magnitude

    r_j = the `ablation.penalty_quantile` quantile (default 0.99) of |c_j| over every position of them.

While training, each forward adds

    P = sum over layers L, mean over positions t, sum over directions j of relu(|c_tj| / r_j - 1)^2

and the loss is task loss + `ablation.penalty_coef` * P. It is one-sided: a coordinate that stays within
the base model's range, or shrinks, costs nothing; only growth past r_j is penalised, quadratically, in
units of r_j (so one coefficient means the same on models with different residual scales). It is soft: a
large enough task gradient can still push through, which is the trade-off the coefficient sweep of
`baselines.penalty` measures. Positions are every position of a batch (prompt, answer and padding), in the
reference as in the penalty, so the base model itself pays only for its own top 1% (the quantile's tail).

Only activations that require grad contribute (an evaluation under `torch.no_grad()` or a layer upstream of
every trainable parameter adds nothing), and the terms of one forward are taken by `take_penalty` once per
micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from caft.errors import ConfigError, SubspaceError
from caft.training.ablation import Ablation
from caft.training.config import AblationMode
from caft.training.means import load_means, run_coordinates, save_means

if TYPE_CHECKING:
    from torch import nn

    from caft.subspace import Subspace

PENALTY_FILE = "penalty_reference.safetensors"
"""Next to a run: the reference magnitudes r (`layer.<L>`: (k,)), so a resumed run uses the same ones."""
DEFAULT_QUANTILE = 0.99
"""`ablation.penalty_quantile` when unset."""
_FLOOR = 1e-6  # a direction the base model never uses still gets a finite reference
_QUANTILE_MAX = 16_000_000


class PenaltyAblation(Ablation):
    """Identity forward; records coef * relu(|hQ| / r - 1)^2 per layer for the loss (see the module)."""

    mode: AblationMode = "penalty"

    def __init__(
        self, bases: Mapping[int, torch.Tensor], reference: Mapping[int, torch.Tensor], coef: float
    ) -> None:
        super().__init__(bases)
        missing = [L for L in self.layers if L not in reference]
        if missing:
            raise SubspaceError(f"mode `penalty` has no reference magnitudes for layers {missing}")
        self._ref: dict[int, torch.Tensor] = {}
        for L in self.layers:
            r = reference[L].detach().to("cpu", torch.float32).reshape(-1)
            if r.numel() != self._bases[L].shape[1]:
                raise SubspaceError(
                    f"penalty reference for layer {L} has {r.numel()} values; the subspace has "
                    f"{self._bases[L].shape[1]} directions there"
                )
            self._ref[L] = r.clamp_min(_FLOOR)
        if coef < 0:
            raise ConfigError(f"ablation.penalty_coef must be >= 0, got {coef}")
        self.coef = float(coef)
        self._terms: list[torch.Tensor] = []

    @property
    def reference(self) -> dict[int, torch.Tensor]:
        return dict(self._ref)

    def _apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        if h.requires_grad and self.coef > 0:
            with torch.autocast(device_type=h.device.type, enabled=False):
                q = self._cast("q32", layer, self._bases[layer], h.float())
                r = self._cast("r", layer, self._ref[layer], h.float())
                c = h.float() @ q  # (..., k)
                excess = torch.relu(c.abs() / r - 1.0)
                self._terms.append(excess.pow(2).sum(-1).mean())
        return h

    def take(self) -> torch.Tensor | None:
        """coef * P of the forwards since the last call (None when nothing was recorded); clears them."""
        if not self._terms:
            return None
        total = torch.stack([t.to(self._terms[0].device) for t in self._terms]).sum()
        self._terms.clear()
        return self.coef * total

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["penalty_coef"] = self.coef
        out["penalty_formula"] = "coef * sum_L mean_t sum_j relu(|h_t q_j| / r_j - 1)^2"
        return out


def take_penalty(abl: Ablation | None, loss: torch.Tensor) -> torch.Tensor:
    """`loss` plus the penalty recorded by `abl` in the forward that produced it (unchanged for the other
    modes). The trainer calls this on every micro-batch's loss."""
    if not isinstance(abl, PenaltyAblation):
        return loss
    term = abl.take()
    return loss if term is None else loss + term.to(loss.device, loss.dtype)


def reference_magnitudes(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    subspace: Subspace,
    quantile: float = DEFAULT_QUANTILE,
) -> dict[int, torch.Tensor]:
    """r_j per layer: the `quantile` of |hQ|_j over every position of `batches` (the positions the penalty
    sees), from `model` as it is (the base model before training)."""
    if not 0.0 < quantile <= 1.0:
        raise ConfigError(f"ablation.penalty_quantile must be in (0, 1], got {quantile}")
    coords: dict[int, list[torch.Tensor]] = {}

    def on_coords(layer: int, c: torch.Tensor) -> None:
        c = c.abs()  # (B, T, k)
        coords.setdefault(layer, []).append(c.reshape(-1, c.shape[-1]).cpu())

    layers = run_coordinates(model, batches, subspace, on_coords)
    out: dict[int, torch.Tensor] = {}
    for L in layers:
        values = torch.cat(coords[L]) if coords.get(L) else torch.zeros(0)
        if values.shape[0] == 0:
            raise SubspaceError("no tokens to compute the penalty's reference magnitudes from")
        if values.numel() > _QUANTILE_MAX:  # torch.quantile's input limit: an even subsample of the tokens
            values = values[:: -(-values.numel() // _QUANTILE_MAX)]
        out[L] = torch.quantile(values, quantile, dim=0).clamp_min(_FLOOR)
    return out


def save_reference(path: str | Path, reference: Mapping[int, torch.Tensor]) -> None:
    """Reference magnitudes as `layer.<L>` tensors (the layout of the reference means)."""
    save_means(path, reference)


def load_reference(path: str | Path) -> dict[int, torch.Tensor]:
    """Reference magnitudes written by `save_reference`."""
    return load_means(path)


def make_penalty(
    subspace: Subspace, reference: Mapping[int, torch.Tensor] | None, coef: float | None
) -> PenaltyAblation:
    """The `penalty` mode over `subspace` with reference magnitudes from `reference_magnitudes`."""
    if coef is None:
        raise ConfigError("mode `penalty` needs ablation.penalty_coef (the weight of the penalty, e.g. 1)")
    if reference is None:
        raise SubspaceError(
            "mode `penalty` needs reference magnitudes: reference_magnitudes(model, batches, subspace)"
        )
    return PenaltyAblation({L: subspace.bases[L] for L in subspace.layers}, reference, coef)
