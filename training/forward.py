"""The training forward: the ablated one through nnsight, and the one the loop calls (`make_forward`).

nnsight reads the source of traced code, so the trace lives here, in a file, in one small function
(it cannot run from stdin or `exec`). The layer outputs are edited in forward order; the model's whole
output object is saved, and the caller takes `.loss` / `.logits` from it and calls `backward()` on the
loss as usual: the edit is part of the autograd graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from caft.sites import Sites
    from caft.training.ablation import Ablation
    from caft.training.config import TrainConfig
    from caft.training.objectives import ObjectiveLoss
    from caft.training.setup import Prepared


def wrap(model: Any) -> Any:
    """An nnsight wrapper around a torch module (transformers model, peft model, or classifier)."""
    import warnings

    from nnsight import NNsight

    with warnings.catch_warnings():
        # BERT-style layers have a child called `output`; nnsight renames it and keeps `.output` as the
        # module's output, which is what the ablation edits
        warnings.filterwarnings("ignore", message=r".*has a submodule named 'output'")
        return NNsight(model)


def ablated_forward(nn_model: Any, sites: Sites, abl: Ablation, inputs: dict[str, Any]) -> Any:
    """Run one forward with `abl` applied at its layers; returns the model's output (loss, logits, ...)."""
    with nn_model.trace(**inputs):
        for layer in abl.layers:
            envoy = sites.layer_envoy(nn_model, layer)
            out = envoy.output
            envoy.output = sites.replace_hidden(out, abl.apply(sites.hidden(out), layer))
        result = nn_model.output.save()
    return result


def make_forward(
    cfg: TrainConfig, prep: Prepared, objective: ObjectiveLoss, abl: Ablation | None, model: Any
) -> Callable[[dict[str, torch.Tensor]], Any]:
    """batch -> output of `model` (the model, or its DDP wrapper), with `abl` through an nnsight trace when
    given (else the caller has hooked the ablation on, or there is none), under autocast."""
    nn_model = wrap(prep.model) if abl is not None else None
    autocast = _autocast(cfg, prep.device)

    def forward(batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: _to(v, prep.device) for k, v in objective.inputs(batch).items()}
        with autocast():
            if abl is not None:
                return objective.run(lambda: ablated_forward(nn_model, prep.sites, abl, inputs))
            return objective.run(lambda: model(**inputs))

    return forward


def _to(value: Any, device: torch.device) -> Any:
    import torch

    return value.to(device) if isinstance(value, torch.Tensor) else value


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], Any]:
    """bf16 autocast when `optim.precision` is bf16, else a no-op context."""
    if cfg.optim.precision == "bf16":
        import torch

        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
