"""Concept ablation: what happens to the residual stream at the subspace's layers while fine-tuning.

An `Ablation` has one job, `apply(h, layer) -> h`, for hidden states `h` of shape (..., d_model) at a
resolved layer index. The training loop calls it at every chosen layer and every token position and never
looks at which mode runs. Five modes, after the CAFT paper and the follow-up discussion of what makes it work:

    project   h - (hQ)Q^T                     removes span(Q) from activations AND from gradients (CAFT)
    mean      h - (hQ)Q^T + mu Q^T            the span(Q) component is pinned to its reference mean mu (k,)
    detached  h - stopgrad((hQ)Q^T)           activation effect only; gradients pass as if nothing happened
    gradient  h (forward), g - (gQ)Q^T (back) gradient effect only; the forward is untouched
    steer     h + c v                         preventative steering; v = mu Q^T, the mean projection of
                                              span(Q) over the training data, unless vectors are given

Two ways to install it:

* the trainer edits layer outputs inside an nnsight trace (see `caft.training.forward`);
* `with ablated(model, abl): ...` registers plain torch forward hooks, for evaluation, test-time-only
  ablation baselines and generation. The hooks come off on exit, so a saved model never carries them.

The autograd Functions of the linear modes live in `caft.training.projection`; the reference means of
modes `mean` and `steer` in `caft.training.means`.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, get_args

import torch

from caft.errors import ConfigError, SubspaceError
from caft.sites import Sites
from caft.subspace import Column, Subspace
from caft.training.config import AblationMode

# Their own modules now; still importable from here (__all__), where callers have always found them.
from caft.training.means import compute_subspace_means, load_means, mean_coordinates, save_means
from caft.training.projection import DetachedFn, ProjectFn, ProjectGradFn

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MODES",
    "Ablation",
    "AblationMode",
    "DetachedAblation",
    "DetachedFn",
    "GradientAblation",
    "MeanAblation",
    "ProjectAblation",
    "ProjectFn",
    "ProjectGradFn",
    "SteerAblation",
    "ablated",
    "compute_subspace_means",
    "load_means",
    "make_ablation",
    "mean_coordinates",
    "parse_layer_spec",
    "random_subspace",
    "save_means",
    "steer_vectors",
]

log = logging.getLogger(__name__)

MODES: tuple[AblationMode, ...] = get_args(AblationMode)


class Ablation(ABC):
    """Per-layer edit of hidden states. Subclasses implement `_apply` for one mode.

    Bases are kept in float32 on the CPU and cast once per (layer, device, dtype) to match `h`, so the same
    object serves a bf16 model on a GPU and an fp32 test model on the CPU.
    """

    mode: AblationMode

    def __init__(self, bases: Mapping[int, torch.Tensor]) -> None:
        self._bases: dict[int, torch.Tensor] = {
            int(layer): q.detach().to("cpu", torch.float32)
            for layer, q in sorted(bases.items())
            if q.shape[-1] > 0
        }
        self._cache: dict[tuple[str, int, str, Any], torch.Tensor] = {}

    @property
    def layers(self) -> list[int]:
        """Resolved layer indices this ablation touches, in forward order."""
        return sorted(self._bases)

    def basis(self, layer: int) -> torch.Tensor:
        """Q of `layer` as stored: float32, CPU, shape (d, k)."""
        return self._bases[layer]

    def _cast(self, name: str, layer: int, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (name, layer, str(like.device), like.dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = t.to(device=like.device, dtype=like.dtype)
            self._cache[key] = hit
        return hit

    def _q(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self._cast("q", layer, self._bases[layer], h)

    def apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The edited hidden states (same shape and dtype as `h`); layers outside `self.layers` pass through."""
        if layer not in self._bases:
            return h
        return self._apply(h, layer)

    @abstractmethod
    def _apply(self, h: torch.Tensor, layer: int) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]:
        """What goes into caft_training.json."""
        return {"mode": self.mode, "layers": {str(L): int(q.shape[1]) for L, q in self._bases.items()}}


class ProjectAblation(Ablation):
    """h - (hQ)Q^T. Autograd differentiates through the projection, so the gradient reaching h is projected
    too: CAFT as published."""

    mode: AblationMode = "project"

    def _apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        out: torch.Tensor = ProjectFn.apply(h, self._q(h, layer), None)  # (..., d)
        return out


class DetachedAblation(Ablation):
    """h - stopgrad((hQ)Q^T): the same forward as `project`, the gradients of no ablation."""

    mode: AblationMode = "detached"

    def _apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        out: torch.Tensor = DetachedFn.apply(h, self._q(h, layer))
        return out


class MeanAblation(Ablation):
    """Replace the span(Q) component by its mean over a reference set: h - (hQ - mu)Q^T.

    Zero is an arbitrary constant for a direction whose typical value is far from zero; the reference mean
    keeps the activation on-distribution while still removing its variation (and its gradient).
    """

    mode: AblationMode = "mean"

    def __init__(self, bases: Mapping[int, torch.Tensor], means: Mapping[int, torch.Tensor]) -> None:
        super().__init__(bases)
        self._means = {layer: mean_coordinates(layer, q, means) for layer, q in self._bases.items()}

    @property
    def means(self) -> dict[int, torch.Tensor]:
        """Reference means as span(Q) coordinates, (k,) per layer."""
        return dict(self._means)

    def _apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        mu_q = self._cast("muq", layer, self._means[layer] @ self._bases[layer].T, h)  # (d,) = mu Q^T
        out: torch.Tensor = ProjectFn.apply(h, self._q(h, layer), mu_q)
        return out


class GradientAblation(Ablation):
    """Identity forward; the gradient flowing back through h loses its span(Q) component."""

    mode: AblationMode = "gradient"

    def _apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        if not h.requires_grad:
            return h
        out: torch.Tensor = ProjectGradFn.apply(h, self._q(h, layer))
        return out


class SteerAblation(Ablation):
    """h + c v with one vector per layer (preventative steering). `source` says where v came from
    (`mean_projection` or `given`), for the training record."""

    mode: AblationMode = "steer"

    def __init__(self, vectors: Mapping[int, torch.Tensor], coef: float, source: str = "given") -> None:
        bases = {L: v.detach().to("cpu", torch.float32).reshape(-1, 1) for L, v in vectors.items()}
        super().__init__(bases)
        self.coef = float(coef)
        self.source = source

    def _apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        v = self._cast("v", layer, self._bases[layer][:, 0] * self.coef, h)  # (d,)
        return h + v

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(steer_coef=self.coef, steer_vector=self.source)
        out["steer_norms"] = {str(L): float(v.norm()) for L, v in self._bases.items()}
        return out


def make_ablation(
    mode: AblationMode,
    subspace: Subspace,
    means: Mapping[int, torch.Tensor] | None = None,
    steer_coef: float | None = None,
    vectors: Mapping[int, torch.Tensor] | None = None,
    penalty_coef: float | None = None,
    reference: Mapping[int, torch.Tensor] | None = None,
) -> Ablation:
    """Build the ablation of `mode` over `subspace`.

    `means` (mode `mean`): per-layer reference mean, either span(Q) coordinates (k,) or a full vector (d,).
    `steer_coef` and `vectors` (mode `steer`): see `steer_vectors`. `penalty_coef` and `reference` (mode
    `penalty`): see `caft.training.penalty`. The subspace's layers must already be
    resolved (non-negative), as `Subspace.load` guarantees.
    """
    if mode not in MODES:
        raise SubspaceError(f"unknown ablation mode {mode!r}; choose one of {', '.join(MODES)}")
    bases = {L: subspace.bases[L] for L in subspace.layers}
    for L in bases:
        if L < 0:
            raise SubspaceError(f"subspace layer {L} is negative; resolve layers against the model first")
    if mode == "project":
        return ProjectAblation(bases)
    if mode == "detached":
        return DetachedAblation(bases)
    if mode == "gradient":
        return GradientAblation(bases)
    if mode == "mean":
        if means is None:
            raise SubspaceError(
                "mode `mean` needs reference means: compute_subspace_means(model, batches, subspace)"
            )
        return MeanAblation(bases, means)
    if mode == "penalty":
        from caft.training.penalty import make_penalty  # penalty.py builds on this module

        return make_penalty(subspace, reference, penalty_coef)
    # steer
    if steer_coef is None:
        raise ConfigError(
            "mode `steer` needs an explicit signed coefficient: set ablation.steer_coef (--steer-coef), e.g. 4 "
            "to add the mean projection or -4 to subtract it (the sign that helps depends on the model)"
        )
    given = vectors is not None
    steer = steer_vectors(subspace, means=means, vectors=vectors)
    return SteerAblation(steer, steer_coef, source="given" if given else "mean_projection")


def steer_vectors(
    subspace: Subspace,
    means: Mapping[int, torch.Tensor] | None = None,
    vectors: Mapping[int, torch.Tensor] | None = None,
) -> dict[int, torch.Tensor]:
    """The vectors v of `steer` (h + c v), one (d,) per layer.

    Default: v = mu Q^T, the mean over the training data of each layer's projection (hQ)Q^T onto the
    subspace (`means` from `compute_subspace_means`, as for mode `mean`). It uses every column with its
    typical size, so c is a multiple of the typical projection; the CAFT authors recovered most of the
    ablation's effect by steering with this vector scaled by about 3-5, positive for one model and negative
    for another. There is therefore no default coefficient: `make_ablation` refuses `steer` without one.

    `vectors` replace the default; a layer whose vector lies along only some of its subspace's columns (or
    a subspace layer without a vector) is logged as a warning, since the other columns are then not steered.
    """
    bases = {L: subspace.bases[L].detach().to("cpu", torch.float32) for L in subspace.layers}
    if vectors is None:
        if means is None:
            raise SubspaceError(
                "mode `steer` steers along the mean projection of the subspace: pass "
                "means=compute_subspace_means(model, batches, subspace) (the trainer does this), or vectors"
            )
        return {L: q @ mean_coordinates(L, q, means) for L, q in bases.items() if q.shape[1] > 0}
    out: dict[int, torch.Tensor] = {}
    for L, v in vectors.items():
        flat = v.detach().to("cpu", torch.float32).reshape(-1)
        if flat.numel() != subspace.d_model:
            raise SubspaceError(
                f"steering vector for layer {L} has {flat.numel()} values, expected d_model={subspace.d_model}"
            )
        out[int(L)] = flat
    for L, q in bases.items():
        k = q.shape[1]
        if k < 2:
            continue
        if L not in out:
            log.warning(
                "steer: subspace layer %d (%d columns) has no steering vector and is not steered", L, k
            )
            continue
        coords = out[L] @ q  # (k,)
        used = int((coords.abs() > 1e-3 * max(float(out[L].norm()), 1e-12)).sum())
        if used < k:
            log.warning(
                "steer: the vector for layer %d lies along %d of the subspace's %d columns; the others are not "
                "steered (the default vector, the mean projection, uses them all)",
                L,
                used,
                k,
            )
    return out


@contextlib.contextmanager
def ablated(model: nn.Module, abl: Ablation | None) -> Iterator[nn.Module]:
    """Run `model` with `abl` applied through plain forward hooks at the subspace's layers (every token
    position, every forward call, generation included). `None` is a no-op, so callers can pass an optional
    ablation straight through. Hooks are removed on exit, also on error."""
    if abl is None or not abl.layers:
        yield model
        return
    sites = Sites.of(model)
    handles = []
    try:
        for L in sites.check_layers(abl.layers):
            handles.append(sites.layer_module(model, L).register_forward_hook(_hook(abl, L)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _hook(abl: Ablation, layer: int) -> Any:
    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        return Sites.replace_hidden(output, abl.apply(Sites.hidden(output), layer))

    return hook


def random_subspace(spec: str | Mapping[int, int], d_model: int, seed: int, n_layers: int) -> Subspace:
    """A random orthonormal subspace (the random-directions baseline): `spec` is `"LAYER:K,LAYER:K"`
    (negative layers count from the end) or a mapping layer -> k."""
    counts = parse_layer_spec(spec) if isinstance(spec, str) else dict(spec)
    gen = torch.Generator().manual_seed(seed)
    bases: dict[int, torch.Tensor] = {}
    columns: dict[int, list[Column]] = {}
    for raw_layer, k in counts.items():
        layer = raw_layer + n_layers if raw_layer < 0 else raw_layer
        if not 0 <= layer < n_layers:
            raise SubspaceError(
                f"random subspace layer {raw_layer} is out of range for a model with {n_layers} layers"
            )
        if not 0 < k <= d_model:
            raise SubspaceError(f"random subspace layer {raw_layer}: k={k} must be in 1..{d_model}")
        if layer in bases:
            raise SubspaceError(f"random subspace names layer {layer} twice")
        g = torch.randn(d_model, k, generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)
        bases[layer] = q.float()
        columns[layer] = [Column(candidate=f"random:{layer}:{i}", label="random") for i in range(k)]
    sub = Subspace(d_model=d_model, bases=bases, columns=columns, n_layers=n_layers)
    sub.validate(d_model=d_model, n_layers=n_layers)
    return sub


def parse_layer_spec(spec: str) -> dict[int, int]:
    """`"12:20,-4:8"` -> {12: 20, -4: 8}."""
    out: dict[int, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        layer_s, sep, k_s = part.partition(":")
        try:
            if not sep:
                raise ValueError
            layer, k = int(layer_s), int(k_s)
        except ValueError:
            raise SubspaceError(
                f"bad random-subspace item {part!r}: expected LAYER:K, e.g. --random-subspace 2:20,5:20"
            ) from None
        if layer in out:
            raise SubspaceError(f"random subspace names layer {layer} twice in {spec!r}")
        out[layer] = k
    if not out:
        raise SubspaceError(f"empty random-subspace spec {spec!r}: expected LAYER:K,...")
    return out
