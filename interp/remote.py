"""Residual activations from NDIF (nnsight's remote backend), for models too large to load here.

    model: {name_or_path: meta-llama/Llama-3.1-70B, remote: true}     # in a run or interp config

With `remote: true` the interp stages (diff collection, evidence) read the residual stream through an
nnsight trace run with `remote=True`: the weights stay on NDIF, only the token batches go out and the
requested layer outputs come back. Locally only the config and the tokenizer are loaded (nnsight builds the
module tree on the meta device), so the layer paths, the hidden size and the layer count are the ones a
local load would give, and the activations are the same tensors a local forward gives (up to the server's
dtype and kernels).

The key comes from the environment only (`NDIF_API_KEY`, https://login.ndif.us) and is never written or
logged. Before anything is sent, `preflight` checks the key is set, the model config has no adapter (NDIF
serves hub models; a local adapter cannot run there) and that NDIF serves the model now.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nnsight
import torch

from caft.errors import ConfigError, ModelError
from caft.models import load_tokenizer
from caft.sites import Sites

if TYPE_CHECKING:
    from caft.config import ModelConfig

KEY_ENV = "NDIF_API_KEY"

__all__ = ["KEY_ENV", "RemoteModel", "preflight"]


def preflight(cfg: ModelConfig, *, check_hosted: bool = True) -> None:
    """Fail before any work when `cfg` cannot run on NDIF: no key, an adapter, or a model NDIF does not
    serve now."""
    if not os.environ.get(KEY_ENV):
        raise ConfigError(
            f"model {cfg.name_or_path} has remote: true, which runs it on NDIF and needs an API key in the "
            f"environment: export {KEY_ENV}=... (get one at https://login.ndif.us), or set remote: false "
            "to load the model here"
        )
    if cfg.adapter:
        raise ConfigError(
            f"model {cfg.name_or_path} has remote: true and an adapter ({cfg.adapter}); NDIF runs hub models "
            "only, so a local adapter cannot be applied there. Use a merged model NDIF serves, or remote: false"
        )
    if check_hosted:
        from nnsight import is_model_running

        if not is_model_running(cfg.name_or_path, revision=cfg.revision or "main"):
            raise ModelError(
                f"{cfg.name_or_path} is not served by NDIF right now (or NDIF is unreachable); "
                "`python -c 'import nnsight; print(nnsight.status())'` lists the models it runs. Pick one of "
                "them, or set remote: false to load the model here"
            )


class RemoteModel:
    """A hub model whose forward passes run on NDIF; `hidden` returns residual outputs like a local load.

    `remote=False` runs the same trace locally (nnsight loads the weights on first use): the tests compare
    it with caft's hook-based capture."""

    def __init__(self, cfg: ModelConfig, *, remote: bool = True) -> None:
        model_cls: Any = getattr(nnsight, "TransformersModel", None) or nnsight.LanguageModel
        # the pipeline task is part of NDIF's model key; naming it also spares a hub lookup
        kwargs: dict[str, Any] = {
            "task": "text-generation" if cfg.kind == "causal_lm" else "feature-extraction"
        }
        if cfg.revision:
            kwargs["revision"] = cfg.revision
        if cfg.trust_remote_code:
            kwargs["trust_remote_code"] = True
        self.config = cfg
        self.remote = remote
        self.tokenizer = load_tokenizer(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
        self.nn_model: Any = model_cls(cfg.name_or_path, tokenizer=self.tokenizer, **kwargs)
        self.sites = Sites.of(self.nn_model._module)  # the module tree (meta until weights load)

    def hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
    ) -> dict[int, torch.Tensor]:
        """{layer: (B, T, d)} residual outputs of one batch (float32, on the CPU)."""
        envoys = [self.sites.layer_envoy(self.nn_model, layer) for layer in layers]
        inputs = {"input_ids": input_ids.cpu(), "attention_mask": attention_mask.cpu()}
        try:
            outs = _trace_layers(self.nn_model, envoys, inputs, self.remote)
        except Exception as e:  # the backend's own errors (HTTP, queue, server-side failures)
            where = "on NDIF" if self.remote else "locally"
            raise ModelError(
                f"the nnsight trace of {self.config.name_or_path} {where} failed: {type(e).__name__}: {e}"
            ) from e
        return {layer: Sites.hidden(o).detach().float().cpu() for layer, o in zip(layers, outs, strict=True)}


def _trace_layers(
    nn_model: Any, envoys: list[Any], inputs: dict[str, torch.Tensor], remote: bool
) -> list[Any]:
    # nnsight reads this body's source and (remote) runs it on the server: plain code, no caft calls
    with nn_model.trace(inputs, remote=remote):
        outs = nnsight.save([envoy.output for envoy in envoys])
    return list(outs)
