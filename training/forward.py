"""The ablated training forward through nnsight.

nnsight reads the source of traced code, so the trace lives here, in a file, in one small function
(it cannot run from stdin or `exec`). The layer outputs are edited in forward order; the model's whole
output object is saved, and the caller takes `.loss` / `.logits` from it and calls `backward()` on the
loss as usual: the edit is part of the autograd graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from caft.training.ablation import Ablation

    from caft.sites import Sites


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
