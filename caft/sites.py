"""Model sites: where "the residual stream after decoder layer L" lives, for every supported architecture.

This is the one module that knows module paths (`model.layers`, `transformer.h`, `encoder.layer`, ...).
Everything else asks a `Sites` object:

    sites = Sites.of(hf_model)
    sites.n_layers, sites.d_model
    sites.layer_path(-1)                 # "model.layers.23"
    sites.layer_module(hf_model, 5)      # the torch module whose output is the residual after layer 5
    sites.layer_envoy(nnsight_model, 5)  # the same module as an nnsight envoy
    sites.hidden(output)                 # the hidden-state tensor of a layer output (tuple or tensor)
    sites.replace_hidden(output, h)      # the layer output with its hidden state replaced
    sites.final_norm(hf_model), sites.unembed(hf_model)   # for the logit lens (causal LMs)

transformers 5 returns a plain tensor from decoder layers; older versions and some custom models return
a tuple whose first element is the hidden state. `hidden`/`replace_hidden` handle both, so that nobody
writes `.output[0]` (which on a tensor silently takes batch row 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from caft.errors import SiteError

if TYPE_CHECKING:
    import torch
    from torch import nn

# model_type -> (path of the layer list, path of the final norm or None), relative to the *base* model
# (the module that holds the layers), plus the attribute names under which wrapper models hold that base.
_LAYOUTS: dict[str, tuple[str, str | None]] = {
    "llama": ("layers", "norm"),
    "qwen2": ("layers", "norm"),
    "qwen3": ("layers", "norm"),
    "mistral": ("layers", "norm"),
    "mixtral": ("layers", "norm"),
    "gemma": ("layers", "norm"),
    "gemma2": ("layers", "norm"),
    "gemma3_text": ("layers", "norm"),
    "olmo2": ("layers", "norm"),
    "phi3": ("layers", "norm"),
    "gpt2": ("h", "ln_f"),
    "gpt_neox": ("layers", "final_layer_norm"),
    "bert": ("encoder.layer", None),
    "roberta": ("encoder.layer", None),
    "xlm-roberta": ("encoder.layer", None),
    "distilbert": ("transformer.layer", None),
}
# Where task-head wrappers keep the base model, tried in order ("" = the model is the base model).
_BASE_ATTRS = ("model", "transformer", "gpt_neox", "bert", "roberta", "distilbert", "")

SUPPORTED = tuple(sorted(_LAYOUTS))

_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post)$")
_MODULE_PATH = re.compile(r"(?:^|\.)(?:layers|h|layer)\.(\d+)$")


def hook_layer(hook_name: str) -> int:
    """The layer, in caft's convention (layer L = the residual stream after decoder block L), whose residual
    a hook reads: TransformerLens `blocks.N.hook_resid_post` is layer N and `blocks.N.hook_resid_pre` is
    layer N-1 (the input of block N is the output of block N-1); a module path ending in `layers.N` is the
    output of block N. Raises `SiteError` for every other hook (attention or MLP outputs, `resid_mid`, the
    embeddings), which are not the residual caft reads and writes."""
    m = _TL_HOOK.match(hook_name)
    if m is not None:
        n, kind = int(m.group(1)), m.group(2)
        if kind == "resid_post":
            return n
        if n == 0:
            raise SiteError(
                f"hook {hook_name!r} reads the embeddings (the input of block 0), which is no layer output; "
                "caft reads the residual after a decoder block (`blocks.N.hook_resid_post`)"
            )
        return n - 1
    m = _MODULE_PATH.search(hook_name)
    if m is not None and "hook_" not in hook_name:
        return int(m.group(1))
    raise SiteError(
        f"hook {hook_name!r} is not the residual stream after a decoder block (caft reads and ablates "
        "`blocks.N.hook_resid_post`, or equally `blocks.N+1.hook_resid_pre`); use an SAE trained there"
    )


def _get(root: Any, path: str) -> Any:
    """Follow a dotted path on a torch module or an nnsight envoy (`"model.layers.3"`)."""
    node = root
    for part in path.split("."):
        if part == "":
            continue
        node = node[int(part)] if part.isdigit() and not hasattr(node, part) else getattr(node, part)
    return node


def _has(root: Any, path: str) -> bool:
    try:
        _get(root, path)
    except (AttributeError, IndexError, KeyError, TypeError):
        return False
    return True


def _unwrap_peft(model: Any) -> Any:
    """The transformers model under a peft wrapper (PeftModel -> LoraModel -> model)."""
    node = model
    for _ in range(3):
        if type(node).__module__.startswith("peft") and hasattr(node, "base_model"):
            node = node.base_model
            if hasattr(node, "model") and type(node).__module__.startswith("peft"):
                node = node.model
        else:
            break
    return node


@dataclass(frozen=True)
class Sites:
    """Module paths of one model. Build with `Sites.of(model)`; paths are relative to the model passed in
    (a transformers model, or a peft model wrapping one: then paths go through the peft wrapper)."""

    model_type: str
    n_layers: int
    d_model: int
    layers_path: str
    final_norm_path: str | None
    is_causal_lm: bool

    @classmethod
    def of(cls, model: nn.Module) -> Sites:
        inner = _unwrap_peft(model)
        prefix = _peft_prefix(model, inner)
        config = getattr(inner, "config", None)
        if config is None:
            raise SiteError(f"{type(model).__name__} has no `config`; caft needs a transformers model")
        model_type = str(getattr(config, "model_type", ""))
        text_config = getattr(config, "text_config", None)
        n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        if n_layers is None and text_config is not None:
            n_layers = getattr(text_config, "num_hidden_layers", None)
        d_model = (
            getattr(config, "hidden_size", None)
            or getattr(config, "n_embd", None)
            or getattr(config, "dim", None)
        )
        if d_model is None and text_config is not None:
            d_model = getattr(text_config, "hidden_size", None)
        if n_layers is None or d_model is None:
            raise SiteError(f"cannot read the layer count and hidden size from the config of {model_type!r}")

        layers_path, norm_rel = _find_layers(inner, model_type, int(n_layers))
        base_prefix = _base_prefix(layers_path)
        norm_path = None
        if norm_rel is not None:
            cand = f"{base_prefix}.{norm_rel}" if base_prefix else norm_rel
            norm_path = cand if _has(inner, cand) else None
        is_causal = hasattr(inner, "get_output_embeddings") and inner.get_output_embeddings() is not None

        def join(p: str) -> str:
            return f"{prefix}.{p}" if prefix else p

        return cls(
            model_type=model_type,
            n_layers=int(n_layers),
            d_model=int(d_model),
            layers_path=join(layers_path),
            final_norm_path=join(norm_path) if norm_path else None,
            is_causal_lm=bool(
                is_causal and model_type not in ("bert", "roberta", "xlm-roberta", "distilbert")
            ),
        )

    # ---- layers -----------------------------------------------------------------------------------------
    def resolve_layer(self, layer: int) -> int:
        """Map a possibly negative layer index to 0..n_layers-1, or raise a `SiteError` with the valid range."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise SiteError(f"layer must be an integer, got {layer!r}")
        idx = layer + self.n_layers if layer < 0 else layer
        if not 0 <= idx < self.n_layers:
            raise SiteError(
                f"layer {layer} is out of range for this {self.model_type} model with {self.n_layers} layers: "
                f"valid layers are 0..{self.n_layers - 1} (or -{self.n_layers}..-1 counting from the end)"
            )
        return idx

    def layer_path(self, layer: int) -> str:
        return f"{self.layers_path}.{self.resolve_layer(layer)}"

    def layer_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The torch module whose output is the residual stream after `layer`."""
        mod: nn.Module = _get(model, self.layer_path(layer))
        return mod

    def layer_envoy(self, nn_model: Any, layer: int) -> Any:
        """The same module as an nnsight envoy of `nn_model` (an `nnsight.NNsight` wrapping the model)."""
        return _get(nn_model, self.layer_path(layer))

    # ---- outputs ----------------------------------------------------------------------------------------
    @staticmethod
    def hidden(output: Any) -> torch.Tensor:
        """The hidden-state tensor of a layer's output, whether the layer returns a tensor or a tuple."""
        if isinstance(output, tuple | list):
            first: torch.Tensor = output[0]
            return first
        tensor: torch.Tensor = output
        return tensor

    @staticmethod
    def replace_hidden(output: Any, h: torch.Tensor) -> Any:
        """The layer output with its hidden state replaced by `h` (same container type)."""
        if isinstance(output, tuple):
            return (h, *output[1:])
        if isinstance(output, list):
            return [h, *output[1:]]
        return h

    # ---- logit lens -------------------------------------------------------------------------------------
    def final_norm(self, model: nn.Module) -> nn.Module | None:
        if self.final_norm_path is None:
            return None
        mod: nn.Module = _get(model, self.final_norm_path)
        return mod

    def unembed(self, model: nn.Module) -> nn.Module | None:
        """The unembedding (lm head) of a causal LM; None for encoders."""
        if not self.is_causal_lm:
            return None
        inner = _unwrap_peft(model)
        head: nn.Module | None = inner.get_output_embeddings()
        return head

    def token_logits(self, model: nn.Module, hidden: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        """Logits of `token_ids` only, (..., n), from final-normed hidden states (..., d): the rows of the
        unembedding (plus its bias) and the model's final logit soft-capping (Gemma-2), nothing over the
        rest of the vocabulary. Equals the model's own logits at those ids."""
        import torch

        head = self.unembed(model)
        if head is None:
            raise SiteError(f"{self.model_type} has no unembedding")
        ids = torch.tensor(token_ids, device=hidden.device)
        full_weight: torch.Tensor = getattr(head, "weight")  # noqa: B009 (typed as a tensor, not Module | Tensor)
        weight = full_weight[ids]  # (n, d)
        bias = getattr(head, "bias", None)
        logits = torch.nn.functional.linear(hidden, weight, bias[ids] if bias is not None else None)
        cap = getattr(getattr(_unwrap_peft(model), "config", None), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def check_layers(self, layers: list[int] | tuple[int, ...]) -> list[int]:
        """Resolve a list of layers, rejecting duplicates after resolution."""
        out = [self.resolve_layer(layer) for layer in layers]
        if len(set(out)) != len(out):
            raise SiteError(
                f"layers {list(layers)} name the same layer twice (after resolving negative indices)"
            )
        return out


def _peft_prefix(model: Any, inner: Any) -> str:
    """Dotted path from a peft wrapper down to the transformers model ('' when `model` is not wrapped)."""
    if model is inner:
        return ""
    for path in ("base_model.model", "base_model"):
        if _has(model, path) and _get(model, path) is inner:
            return path
    raise SiteError(f"cannot locate the transformers model inside {type(model).__name__}")


def _base_prefix(layers_path: str) -> str:
    for attr in _BASE_ATTRS:
        if attr and layers_path.startswith(attr + "."):
            return attr
    return ""


def _find_layers(inner: Any, model_type: str, n_layers: int) -> tuple[str, str | None]:
    from torch import nn

    layout = _LAYOUTS.get(model_type)
    if layout is not None:
        rel, norm = layout
        for attr in _BASE_ATTRS:
            path = f"{attr}.{rel}" if attr else rel
            if _has(inner, path) and isinstance(_get(inner, path), nn.ModuleList):
                return path, norm
    # Unknown architecture: the one ModuleList whose length is the layer count.
    found = [
        name
        for name, mod in inner.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and name
    ]
    if len(found) == 1:
        return found[0], None
    raise SiteError(
        f"caft does not know where the layers of model type {model_type!r} live "
        f"(candidates: {found or 'none'}); supported types: {', '.join(SUPPORTED)}"
    )
