"""The base and the fine-tuned model behind one interface, and residual capture with forward hooks.

    source = ActivationSource.load(base_cfg, ft_cfg)      # one model in memory when ft is an adapter on base
    source.hidden("ft", batch, layers=[4, 8])             # {layer: (B, T, d)} residual outputs

Residual outputs are read with forward hooks on the modules `caft.sites` names; the forward pass stops after
the deepest requested layer (nothing after it is needed), which is why collection can be cheaper than two
full forward passes. Models loaded here are frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from caft.config import ModelConfig
from caft.errors import ConfigError, ModelError
from caft.models import (
    LoadedModel,
    adapter_disabled,
    attach_adapter,
    load_model,
    load_weights,
    resolve_device,
    resolve_dtype,
    same_model,
)
from caft.sites import Sites

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from caft.interp.inputs import TokenBatch

Which = Literal["base", "ft"]


def resolve_models(
    cfg_model: ModelConfig | None,
    cfg_ft: ModelConfig | None,
    model: ModelConfig | None,
    finetuned: ModelConfig | None,
    need_ft: bool = True,
) -> tuple[ModelConfig, ModelConfig | None]:
    """The stage's own `model` / `finetuned` when set, else the run's."""
    base = cfg_model or model
    ft = cfg_ft or finetuned
    if base is None:
        raise ConfigError("no base model: set `model` in the run config (or the stage's own `model`)")
    if need_ft and ft is None:
        raise ConfigError(
            "no fine-tuned model: set `finetuned` (a model folder, or the base model with `adapter`)"
        )
    return base, ft


def model_label(source: ActivationSource) -> str:
    """The fine-tuned model as recorded in provenance: `path` or `path+adapter` ("" without one)."""
    cfg = source.ft_config
    if cfg is None:
        return ""
    return f"{cfg.name_or_path}+{cfg.adapter}" if cfg.adapter else str(cfg.name_or_path)


def default_layers(n_layers: int) -> list[int]:
    """Layers at 1/4, 1/2 and 3/4 of the depth (deduplicated, for very shallow models)."""
    picks = sorted({max(0, min(n_layers - 1, round(n_layers * f))) for f in (0.25, 0.5, 0.75)})
    return picks


# ---- capture ---------------------------------------------------------------------------------------------


class _StopForwardError(Exception):
    """Raised by the hook of the deepest requested layer: later layers are not needed."""


def capture_layers(
    model: nn.Module,
    sites: Sites,
    layers: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    stop_early: bool = True,
) -> dict[int, torch.Tensor]:
    """Residual outputs of `layers` for one batch: {layer: (B, T, d)}. No gradients."""
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(_mod: nn.Module, _inp: Any, output: Any) -> None:
            captured[layer] = sites.hidden(output).detach()
            if stop_early and layer == last:
                raise _StopForwardError

        return hook

    for layer in layers:
        handles.append(sites.layer_module(model, layer).register_forward_hook(make_hook(layer)))
    try:
        with torch.no_grad(), contextlib.suppress(_StopForwardError):
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    missing = [layer for layer in layers if layer not in captured]
    if missing:
        raise ModelError(f"layers {missing} produced no output in the forward pass")
    return captured


# ---- loading ---------------------------------------------------------------------------------------------


def _has_tokenizer_files(path: str) -> bool:
    p = Path(path)
    if not p.is_dir():
        return True  # a hub id: let transformers decide
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")
    return any((p / n).is_file() for n in names)


def _is_adapter_dir(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _load_weights_only(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LoadedModel:
    """Load a model folder that holds weights but no tokenizer (e.g. an encoder saved next to a head);
    the base model's tokenizer is used."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_weights(cfg, dtype)  # through the one resolver, like load_model
    model.to(device)
    if cfg.adapter:
        model = attach_adapter(model, cfg.adapter)
    model.eval()
    return LoadedModel(model, tokenizer, Sites.of(model), device, dtype, cfg)


def _encoder_of_classifier(cfg: ModelConfig) -> ModelConfig:
    """A classifier folder saved by caft's training (`classifier.json` + `encoder/` + head) stands for its
    encoder: activations are read from the encoder's layers."""
    p = Path(cfg.name_or_path)
    if (p / "classifier.json").is_file() and (p / "encoder" / "config.json").is_file():
        return cfg.model_copy(update={"name_or_path": str(p / "encoder"), "kind": "encoder"})
    return cfg


def check_same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, what: str) -> None:
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = len(set(va.items()) ^ set(vb.items()))
        raise ModelError(
            f"{what}: the base and fine-tuned tokenizers differ ({len(va)} vs {len(vb)} tokens, {diff} entries "
            "differ); activation differences need the same tokens in both models. Point `finetuned` at a "
            "fine-tune of this base model (or save the base tokenizer into the fine-tuned folder)"
        )


class ActivationSource:
    """The base and the fine-tuned model behind one interface.

    When the fine-tuned model is a peft adapter on the base model, one model is held in memory and base
    activations are taken with the adapter switched off (`caft.models.adapter_disabled`).
    """

    def __init__(
        self,
        base: LoadedModel,
        ft: LoadedModel | None,
        shared: bool = False,
        ft_config: ModelConfig | None = None,
    ) -> None:
        self.base = base
        self.ft = ft
        self.shared = shared
        self.ft_config = ft_config if ft_config is not None else (ft.config if ft is not None else None)
        self.remote: dict[Which, Any] = {}
        """The models that run on NDIF (`caft.interp.remote.RemoteModel`), by role."""
        if ft is not None and not shared:
            check_same_tokenizer(base.tokenizer, ft.tokenizer, "base vs fine-tuned")
            sb, sf = base.sites, ft.sites
            if (sb.d_model, sb.n_layers) != (sf.d_model, sf.n_layers):
                raise ModelError(
                    f"the base model (d_model={sb.d_model}, {sb.n_layers} layers) and the fine-tuned model "
                    f"(d_model={sf.d_model}, {sf.n_layers} layers) have different shapes; activation "
                    "differences need a fine-tune of the same base model"
                )

    @classmethod
    def load(cls, base_cfg: ModelConfig, ft_cfg: ModelConfig | None = None) -> ActivationSource:
        """Load the pair. `ft_cfg` may be a full model folder, a folder without tokenizer files (the base
        tokenizer is used), the base model with `adapter` set, or an adapter folder as `name_or_path`."""
        source = cls._load(base_cfg, ft_cfg)
        for lm in (source.base, source.ft):
            if lm is not None:
                lm.model.requires_grad_(False)  # interp never needs parameter gradients
        return source

    @classmethod
    def _load(cls, base_cfg: ModelConfig, ft_cfg: ModelConfig | None) -> ActivationSource:
        if base_cfg.remote or (ft_cfg is not None and ft_cfg.remote):
            return cls._load_remote(base_cfg, ft_cfg)
        base = load_model(base_cfg)
        if ft_cfg is None:
            return cls(base, None)
        ft_cfg = _encoder_of_classifier(ft_cfg)
        adapter: str | None = None
        if ft_cfg.adapter and not base_cfg.adapter and same_model(ft_cfg.name_or_path, base_cfg.name_or_path):
            adapter = ft_cfg.adapter
        elif Path(ft_cfg.name_or_path).is_dir() and _is_adapter_dir(ft_cfg.name_or_path):
            adapter = ft_cfg.name_or_path
        if adapter is not None:
            base.model = attach_adapter(base.model, adapter)
            base.model.eval()
            base.sites = Sites.of(base.model)
            return cls(base, base, shared=True, ft_config=ft_cfg)
        if _has_tokenizer_files(ft_cfg.name_or_path):
            ft = load_model(ft_cfg)
        else:
            ft = _load_weights_only(ft_cfg, base.tokenizer)
        return cls(base, ft)

    @classmethod
    def _load_remote(cls, base_cfg: ModelConfig, ft_cfg: ModelConfig | None) -> ActivationSource:
        """Models with `remote: true` run on NDIF (`caft.interp.remote`); the others load here."""
        from caft.interp.remote import RemoteModel, preflight

        remote: dict[Which, RemoteModel] = {}
        loaded: list[LoadedModel | None] = []
        roles: tuple[tuple[Which, ModelConfig | None], ...] = (("base", base_cfg), ("ft", ft_cfg))
        for which, cfg in roles:
            if cfg is None:
                loaded.append(None)
            elif cfg.remote:
                preflight(cfg)
                rm = remote[which] = RemoteModel(cfg)
                module: nn.Module = rm.nn_model._module
                loaded.append(
                    LoadedModel(module, rm.tokenizer, rm.sites, torch.device("cpu"), torch.float32, cfg)
                )
            else:
                loaded.append(load_model(cfg))
        base, ft = loaded
        assert base is not None
        source = cls(base, ft)
        source.remote = remote
        return source

    # ---- properties -------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.base.tokenizer

    @property
    def sites(self) -> Sites:
        return self.base.sites

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def is_causal_lm(self) -> bool:
        return self.base.sites.is_causal_lm

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid) if pid is not None else 0

    @property
    def has_ft(self) -> bool:
        return self.ft is not None

    def loaded(self, which: Which) -> LoadedModel:
        if which == "base":
            return self.base
        if self.ft is None:
            raise ModelError("no fine-tuned model was given; set `finetuned` (a model folder or an adapter)")
        return self.ft

    @contextlib.contextmanager
    def use(self, which: Which) -> Iterator[LoadedModel]:
        """The model to run for `which` (switching a shared model's adapter off for `base`)."""
        loaded = self.loaded(which)
        if self.shared and which == "base":
            with adapter_disabled(loaded.model):
                yield loaded
        else:
            yield loaded

    def hidden(self, which: Which, batch: TokenBatch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """{layer: (B, T, d)} residual outputs of `which` on `batch`, checked for NaN/inf."""
        if which in self.remote:
            out = self.remote[which].hidden(batch.input_ids, batch.attention_mask, layers)
        else:
            with self.use(which) as lm:
                out = capture_layers(
                    lm.model,
                    lm.sites,
                    layers,
                    batch.input_ids.to(lm.device),
                    batch.attention_mask.to(lm.device),
                )
        for layer, h in out.items():
            bad = ~h.isfinite()
            if bool(bad.any()):
                raise ModelError(
                    f"{which} model produced NaN/inf activations at layer {layer} in batch {batch.index} "
                    f"({int(bad.sum())} values; docs {batch.docs[:3]}). Use dtype float32 (float16 overflows "
                    "easily) or check the weights"
                )
        return out
