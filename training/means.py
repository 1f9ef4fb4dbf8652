"""Reference means of a subspace's coordinates over training data: what modes `mean` and `steer` of
`caft.training.ablation` need, computed by the trainer and saved next to a run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from caft.errors import SubspaceError
from caft.sites import Sites
from caft.subspace import Subspace

if TYPE_CHECKING:
    from torch import nn

__all__ = ["compute_subspace_means", "load_means", "mean_coordinates", "run_coordinates", "save_means"]


def mean_coordinates(layer: int, q: torch.Tensor, means: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """The reference mean of `layer` as span(Q) coordinates (k,), from coordinates or a full (d,) mean."""
    if layer not in means:
        raise SubspaceError(
            f"no reference mean for layer {layer}; compute them with "
            "caft.training.means.compute_subspace_means (the trainer does this for you)"
        )
    mu = means[layer].detach().to("cpu", torch.float32).reshape(-1)
    d, k = q.shape
    if mu.numel() == d:
        mu = mu @ q  # full-space mean -> its coordinates in span(Q)
    elif mu.numel() != k:
        raise SubspaceError(
            f"layer {layer}: the mean has {mu.numel()} values; expected k={k} (coordinates in span(Q)) "
            f"or d_model={d} (a full-space mean)"
        )
    if not torch.isfinite(mu).all():
        raise SubspaceError(f"layer {layer}: the reference mean holds NaN or inf values")
    return mu


def save_means(path: str | Path, means: Mapping[int, torch.Tensor]) -> None:
    """Reference means (`layer.<L>` tensors), as the trainer writes them next to a run."""
    save_file({f"layer.{L}": m.contiguous() for L, m in means.items()}, str(path))


def load_means(path: str | Path) -> dict[int, torch.Tensor]:
    """Reference means written by `save_means` (the run's ablation_means.safetensors)."""
    return {int(k.split(".")[1]): v for k, v in load_file(str(path)).items()}


def compute_subspace_means(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    subspace: Subspace,
) -> dict[int, torch.Tensor]:
    """Mean of hQ (span(Q) coordinates, (k,) per layer) over the tokens of `batches`, in float64.

    Each batch is a mapping of model inputs (`input_ids`, `attention_mask`, ...). Tokens are weighted by
    `loss_mask` when a batch has one (e.g. assistant tokens), else by `attention_mask`, else all count.
    Keys that are not model inputs (`labels`, `loss_mask`) are not passed to the model.
    """
    sums: dict[int, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64)
    weight: dict[str, torch.Tensor] = {}

    def on_batch(batch: Mapping[str, torch.Tensor], device: torch.device) -> None:
        nonlocal count
        mask = batch.get("loss_mask", batch.get("attention_mask"))
        w = (
            torch.ones(batch["input_ids"].shape, dtype=torch.float64)
            if mask is None
            else mask.to(torch.float64)
        )
        weight["w"] = w.to(device)
        count += w.sum()

    def on_coords(layer: int, coords: torch.Tensor) -> None:
        s = (coords.double() * weight["w"][..., None]).sum(dim=(0, 1)).cpu()
        sums[layer] = sums[layer] + s if layer in sums else s

    layers = run_coordinates(model, batches, subspace, on_coords, on_batch)
    if count.item() == 0:
        raise SubspaceError("no tokens to compute reference means from (empty batches or all-zero masks)")
    return {L: (sums[L] / count).float() for L in layers}


class _StopForwardError(Exception):
    """Raised by a hook after the last layer whose coordinates are needed, to end the forward there."""


def run_coordinates(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    subspace: Subspace,
    on_coords: Callable[[int, torch.Tensor], None],
    on_batch: Callable[[Mapping[str, torch.Tensor], torch.device], None] | None = None,
) -> list[int]:
    """Run `model` as it is (eval mode, no grad) over `batches`, handing each subspace layer's coordinates
    hQ ((B, T, k), float32) to `on_coords(layer, coords)`; `on_batch(batch, device)` sees each batch first.
    Keys that are not model inputs (`labels`, `loss_mask`, `label`) are not passed to the model. Returns the
    layers (checked against the model).

    The forward stops after the last subspace layer: the layers above it and the output head (on Gemma-3 a
    262,144-row unembedding applied at every token, 2/3 of the pass's time) change no coordinate here."""
    sites = Sites.of(model)
    layers = sites.check_layers(subspace.layers)

    def make_hook(L: int) -> Any:
        def hook(_m: Any, _i: Any, output: Any) -> None:
            h = Sites.hidden(output).detach()
            on_coords(L, h.float() @ subspace.bases[L].to(h.device, torch.float32))

        return hook

    def stop(_m: Any, _i: Any, _output: Any) -> None:
        raise _StopForwardError

    device = next(model.parameters()).device
    handles = [sites.layer_module(model, L).register_forward_hook(make_hook(L)) for L in layers]
    if layers:  # registered last, so the last layer's coordinates are handed over before it fires
        handles.append(sites.layer_module(model, max(layers)).register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if on_batch is not None:
                    on_batch(batch, device)
                inputs = {
                    k: v.to(device) for k, v in batch.items() if k not in ("labels", "loss_mask", "label")
                }
                with contextlib.suppress(_StopForwardError):
                    model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return layers
