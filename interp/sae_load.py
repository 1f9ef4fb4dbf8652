"""SAEs from anywhere, as one `LoadedSAE`: sae-lens (published or saved folders) and dictionary_learning.

Every SAE is wrapped with `encode(x) -> (N, d_sae)` and `W_dec` (d_sae, d_in), so the rankings and the
evidence pass do not care where it came from. dictionary_learning checkpoints are folders with `ae.pt`
(a state dict) and `config.json` (`{"trainer": {"dict_class": ..., "activation_dim": ..., "dict_size": ...,
"k": ..., "layer": ...}}`). sae-lens is imported only when an sae-lens SAE is loaded (it takes seconds).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from caft.errors import ModelError, SiteError
from caft.interp.config import SAESpec
from caft.interp.sae_dl import DL_CLASSES, DL_KINDS, DLJumpReLU
from caft.rundir import atomic_write_json
from caft.sites import hook_layer

log = logging.getLogger(__name__)

REGISTRY_FILE = "saes.json"


class LoadedSAE:
    """An SAE reading the residual output of one layer."""

    def __init__(
        self,
        name: str,
        layer: int,
        module: nn.Module,
        W_dec: torch.Tensor,
        d_in: int,
        d_sae: int,
        kind: str,
        input_scale: float = 1.0,
        spec: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.layer = layer
        self.module = module
        self.W_dec = W_dec  # (d_sae, d_in)
        self.d_in = d_in
        self.d_sae = d_sae
        self.kind = kind
        self.input_scale = input_scale
        self.spec = spec or {}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d_in) activations -> (N, d_sae) latent activations."""
        param = self.W_dec
        with torch.no_grad():
            z = cast(Any, self.module).encode(x.to(device=param.device, dtype=param.dtype) * self.input_scale)
        out: torch.Tensor = z.float()
        return out

    def directions(self) -> torch.Tensor:
        """(d_sae, d_in) unit decoder directions."""
        w = self.W_dec.detach().float()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def to(self, device: torch.device | str) -> LoadedSAE:
        self.module.to(device)
        self.W_dec = self.W_dec.to(device)
        return self


# ---- dictionary_learning ---------------------------------------------------------------------------------


def load_dictionary_learning(path: str | Path, layer: int, name: str | None = None) -> LoadedSAE:
    """A dictionary_learning checkpoint folder (`ae.pt` + `config.json`)."""
    folder = Path(path)
    ae, cfg_path = folder / "ae.pt", folder / "config.json"
    if not ae.is_file() or not cfg_path.is_file():
        raise ModelError(f"{folder} is not a dictionary_learning checkpoint (needs ae.pt and config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path} is not valid JSON: {e}") from e
    trainer = cfg.get("trainer", cfg)
    cls_name = trainer.get("dict_class") or trainer.get("trainer_class")
    kind = DL_CLASSES.get(str(cls_name))
    if kind is None:
        raise ModelError(
            f"{cfg_path}: unsupported dictionary class {cls_name!r}; supported: {sorted(set(DL_CLASSES))}"
        )
    cfg_layer = trainer.get("layer")
    if cfg_layer is not None and int(cfg_layer) != layer:
        raise SiteError(
            f"{folder} was trained on layer {cfg_layer}, but the spec puts it at layer {layer}; fix `layer`"
        )
    state: dict[str, torch.Tensor] = torch.load(ae, map_location="cpu", weights_only=True)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved under torch.compile
    cls = DL_KINDS[kind]
    expected = set(cls.keys)
    required = expected - {"threshold", "k"} if kind in ("topk", "batchtopk") else expected
    missing, extra = required - set(state), set(state) - expected
    if missing:
        raise ModelError(
            f"{ae} lacks {sorted(missing)} for a {cls_name} (keys found: {sorted(state)[:10]}); is "
            "config.json's dict_class right?"
        )
    if extra:
        log.warning("%s: ignoring unexpected keys %s", ae, sorted(extra))
    if kind == "jumprelu":
        d_in, d_sae = state["W_enc"].shape
    else:
        d_sae, d_in = state["encoder.weight"].shape
    k = trainer.get("k")
    if "k" in state:
        k = int(state["k"])
    if kind in ("topk", "batchtopk") and k is None:
        raise ModelError(f"{folder}: a {cls_name} needs `k` (in config.json's trainer or the state dict)")
    module = cls(int(d_in), int(d_sae), k)
    module.load_state_dict({key: v for key, v in state.items() if key in expected}, strict=False)
    if isinstance(module, DLJumpReLU):
        module.apply_b_dec_to_input = bool(trainer.get("apply_b_dec_to_input", False))
    module.eval()
    return LoadedSAE(
        name or f"dl:{folder.name}",
        layer,
        module,
        module.w_dec().detach(),
        int(d_in),
        int(d_sae),
        f"dictionary_learning:{kind}",
        spec={"source": "dictionary_learning", "path": str(folder), "layer": layer},
    )


# ---- sae-lens --------------------------------------------------------------------------------------------


def sae_lens_hook_name(sae: Any) -> str | None:
    """The hook an sae-lens SAE was trained on: `cfg.metadata.hook_name` (sae-lens 6), else `cfg.hook_name`
    (earlier versions); None when neither is recorded (SAEs built in code)."""
    cfg = getattr(sae, "cfg", None)
    meta = getattr(cfg, "metadata", None)
    for value in (getattr(meta, "hook_name", None), getattr(cfg, "hook_name", None)):
        if isinstance(value, str) and value:
            return value
    return None


def check_hook(hook_name: str | None, layer: int, name: str) -> None:
    """Refuse an SAE whose own hook is not the residual after `layer` (e.g. `blocks.8.hook_resid_pre` put
    at layer 8: it was trained on the output of block 7, so it would encode the wrong residual)."""
    if hook_name is None:
        log.debug("SAE %s records no hook name; trusting the spec's layer %d", name, layer)
        return
    try:
        read = hook_layer(hook_name)
    except SiteError as e:
        raise SiteError(f"SAE {name!r}: {e}") from None
    if read != layer:
        raise SiteError(
            f"SAE {name!r} was trained on {hook_name!r}, which is layer {read} in caft's convention (the "
            f"residual after decoder block {read}), but the spec puts it at layer {layer}; set `layer: {read}` "
            "or pick the SAE trained on the layer you want"
        )


def _wrap_sae_lens(sae: Any, name: str, layer: int, spec: dict[str, Any], scale: float = 1.0) -> LoadedSAE:
    hook = sae_lens_hook_name(sae)
    check_hook(hook, layer, name)
    if hook is not None:
        spec = {**spec, "hook_name": hook}
    sae.eval()
    return LoadedSAE(
        name, layer, sae, sae.W_dec.detach(), int(sae.cfg.d_in), int(sae.cfg.d_sae), "sae_lens", scale, spec
    )


def load_sae_lens_dir(path: str | Path, layer: int, name: str | None = None) -> LoadedSAE:
    """A folder saved by sae-lens (`cfg.json` + `sae_weights.safetensors`); a `caft_sae.json` next to them
    (written when caft trains the SAE) supplies the input scale."""
    from sae_lens import SAE

    folder = Path(path)
    if not (folder / "cfg.json").is_file():
        raise ModelError(f"{folder} is not an sae-lens folder (no cfg.json)")
    sae = SAE.load_from_disk(str(folder), device="cpu")
    scale = 1.0
    meta_path = folder / "caft_sae.json"
    label = name or f"sae_lens:{folder.name}"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        scale = float(meta.get("input_scale", 1.0))
        trained_at = meta.get("layer")
        if trained_at is not None and int(trained_at) != layer:
            raise SiteError(
                f"SAE {label!r} was trained by caft on layer {trained_at} ({meta_path}), but the spec puts it "
                f"at layer {layer}; fix `layer`"
            )
    spec = {"source": "sae_lens_dir", "path": str(folder), "layer": layer}
    return _wrap_sae_lens(sae, label, layer, spec, scale)


def load_sae_lens_pretrained(release: str, sae_id: str, layer: int, name: str | None = None) -> LoadedSAE:
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:  # sae-lens raises ValueError / OSError / hub errors for unknown or unreachable ids
        raise ModelError(
            f"cannot load the sae-lens SAE {release}/{sae_id}: {type(e).__name__}: {str(e)[:200]}. Check the "
            "release and id (sae-lens' pretrained_saes.yaml), and that the files are cached when offline"
        ) from e
    spec = {"source": "sae_lens", "release": release, "sae_id": sae_id, "layer": layer}
    return _wrap_sae_lens(sae, name or f"{release}/{sae_id}", layer, spec)


# ---- specs, sites, the registry --------------------------------------------------------------------------


def load_spec(spec: SAESpec, layer: int) -> LoadedSAE:
    if spec.source == "sae_lens":
        return load_sae_lens_pretrained(cast(str, spec.release), cast(str, spec.sae_id), layer, spec.name)
    if spec.source == "sae_lens_dir":
        return load_sae_lens_dir(cast(str, spec.path), layer, spec.name)
    if spec.source == "dictionary_learning":
        return load_dictionary_learning(cast(str, spec.path), layer, spec.name)
    raise ValueError(f"source {spec.source!r} is not loadable (train it first)")


def check_site(sae: LoadedSAE, d_model: int) -> None:
    if sae.d_in != d_model:
        raise SiteError(
            f"SAE {sae.name!r} reads {sae.d_in}-dim activations but layer {sae.layer} of this model has "
            f"d_model={d_model}; use an SAE trained on this model"
        )


def save_registry(folder: Path, saes: Sequence[LoadedSAE]) -> None:
    atomic_write_json(
        folder / REGISTRY_FILE,
        [
            {**s.spec, "name": s.name, "layer": s.layer, "d_in": s.d_in, "d_sae": s.d_sae, "kind": s.kind}
            for s in saes
        ],
    )


def load_registry(folder: str | Path, device: torch.device | str = "cpu") -> dict[str, LoadedSAE]:
    """The SAEs a `sae` stage used, by name (from its `saes.json`)."""
    path = Path(folder) / REGISTRY_FILE
    entries = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, LoadedSAE] = {}
    for e in entries:
        spec = SAESpec(
            layer=int(e["layer"]),
            source=e["source"],
            release=e.get("release"),
            sae_id=e.get("sae_id"),
            path=e.get("path"),
            name=e["name"],
        )
        out[e["name"]] = load_spec(spec, int(e["layer"])).to(device)
    return out
