"""SAEs: loading (sae-lens, dictionary_learning), training a small one, and ranking latents three ways.

Every SAE, whatever its origin, is wrapped as a `LoadedSAE` with `encode(x) -> (N, d_sae)` and
`W_dec` (d_sae, d_in), so the rankings and the evidence pass do not care where it came from.

dictionary_learning checkpoints are folders with `ae.pt` (a state dict) and `config.json`
(`{"trainer": {"dict_class": ..., "activation_dim": ..., "dict_size": ..., "k": ..., "layer": ...}}`).
The state-dict key names below are those the dictionary_learning classes save; the encoders are
re-implemented here so that the package is not needed.

Rankings (each over the analysed tokens, top N per layer by |score|):
    mean_diff     mean over tokens of encode(ft) - encode(base)
    sae_diff      mean over tokens of encode(ft - base)
    attribution   sum over tokens of (W_dec[f] . dLoss/dx) * encode(x)[f], the fine-tuning loss being the
                  next-token loss on the analysed tokens (causal LMs)
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from caft.interp.config import SAEConfig, SAESpec, SAETrainConfig
from caft.interp.schema import Candidate, candidate_id, save_candidates

from caft.config import ModelConfig
from caft.env import scrub_obj
from caft.errors import ConfigError, DataError, ModelError, SiteError

if TYPE_CHECKING:
    import torch
    from caft.interp.collect import ActivationSource, TokenBatch, Which
    from torch import nn

log = logging.getLogger(__name__)

REGISTRY_FILE = "saes.json"
TRAINED_DIR = "trained"
RANK_STATE = "rank_state.pt"


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
        import torch

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


def _dl_modules() -> dict[str, Any]:
    """Encoders of the dictionary_learning classes, keyed by our kind names (built lazily: torch import)."""
    import torch
    from torch import nn

    class DLStandard(nn.Module):
        """`AutoEncoder`: relu(encoder(x - bias))."""

        keys = ("bias", "encoder.weight", "encoder.bias", "decoder.weight")

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

        keys = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold")

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
        """`BatchTopKSAE`: at inference, latents above the learned threshold (batch top-k if none was
        learned)."""

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

        keys = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

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

    return {"standard": DLStandard, "topk": DLTopK, "batchtopk": DLBatchTopK, "jumprelu": DLJumpReLU}


# dict_class / trainer_class names in dictionary_learning configs -> our kind names
_DL_CLASSES = {
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


def load_dictionary_learning(path: str | Path, layer: int, name: str | None = None) -> LoadedSAE:
    """A dictionary_learning checkpoint folder (`ae.pt` + `config.json`)."""
    import torch

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
    kind = _DL_CLASSES.get(str(cls_name))
    if kind is None:
        raise ModelError(
            f"{cfg_path}: unsupported dictionary class {cls_name!r}; supported: {sorted(set(_DL_CLASSES))}"
        )
    cfg_layer = trainer.get("layer")
    if cfg_layer is not None and int(cfg_layer) != layer:
        raise SiteError(
            f"{folder} was trained on layer {cfg_layer}, but the spec puts it at layer {layer}; fix `layer`"
        )
    state: dict[str, torch.Tensor] = torch.load(ae, map_location="cpu", weights_only=True)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved under torch.compile
    cls = _dl_modules()[kind]
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
    if kind == "jumprelu":
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


def _wrap_sae_lens(sae: Any, name: str, layer: int, spec: dict[str, Any], scale: float = 1.0) -> LoadedSAE:
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
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        scale = float(meta.get("input_scale", 1.0))
    spec = {"source": "sae_lens_dir", "path": str(folder), "layer": layer}
    return _wrap_sae_lens(sae, name or f"sae_lens:{folder.name}", layer, spec, scale)


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
    from caft.rundir import atomic_write_json

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


# ---- training --------------------------------------------------------------------------------------------


def train_sae(acts: torch.Tensor, cfg: SAETrainConfig, out_dir: Path, layer: int, name: str) -> LoadedSAE:
    """Train an sae-lens SAE on (N, d) activations and save it (sae-lens folder + caft_sae.json).

    Activations are scaled to mean norm sqrt(d) first (the scale is saved and applied by `encode`)."""
    import os

    import torch
    from sae_lens import (
        SAETrainer,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig

    from caft.rundir import atomic_write_json

    os.environ.setdefault("WANDB_MODE", "disabled")
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise DataError(f"no activations to train the layer-{layer} SAE on")
    if not bool(torch.isfinite(acts).all()):
        raise DataError(f"non-finite activations at layer {layer}; cannot train an SAE on them")
    d = int(acts.shape[1])
    mean_norm = float(acts.norm(dim=1).mean())
    scale = math.sqrt(d) / mean_norm if mean_norm > 0 else 1.0
    data = (acts * scale).float()
    device = str(acts.device)
    torch.manual_seed(cfg.seed)
    d_sae = cfg.expansion * d
    sae: Any
    if cfg.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=d_sae, k=min(cfg.k, d_sae), device=device))
    else:
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(d_in=d, d_sae=d_sae, l1_coefficient=cfg.l1_coefficient, device=device)
        )
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def provider() -> Iterator[torch.Tensor]:
        while True:
            perm = torch.randperm(data.shape[0], generator=gen)
            for start in range(0, data.shape[0] - cfg.batch_size + 1, cfg.batch_size):
                yield data[perm[start : start + cfg.batch_size].to(data.device)]
            if data.shape[0] < cfg.batch_size:
                yield data

    batch = min(cfg.batch_size, int(data.shape[0]))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=max(cfg.training_tokens, batch),
        train_batch_size_samples=batch,
        lr=cfg.lr,
        lr_end=cfg.lr,
        device=device,
        n_checkpoints=0,
    )
    trainer = SAETrainer(trainer_cfg, sae, provider())
    trained = trainer.fit()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    trained.save_inference_model(tmp)
    atomic_write_json(tmp / "caft_sae.json", {"input_scale": scale, "layer": layer, "mean_norm": mean_norm})
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # the folder appears complete or not at all
    return load_sae_lens_dir(out_dir, layer, name)


# ---- ranking ---------------------------------------------------------------------------------------------


def attribution_batch(
    model: nn.Module,
    sites: Any,
    saes: Sequence[LoadedSAE],
    batch: TokenBatch,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """For one batch: {sae name: (d_sae,) sum over non-pad tokens of (W_dec[f] . dLoss/dx) * encode(x)[f]},
    the loss being the mean next-token cross-entropy on the batch's selected tokens."""
    import torch

    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(_mod: nn.Module, _inp: Any, output: Any) -> None:
            h = sites.hidden(output)
            h.retain_grad()
            captured[layer] = h

        return hook

    for layer in sorted({s.layer for s in saes}):
        handles.append(sites.layer_module(model, layer).register_forward_hook(make_hook(layer)))
    ids = batch.input_ids.to(device)
    att = batch.attention_mask.to(device)
    labels = ids.masked_fill(~batch.select.to(device), -100)
    try:
        with torch.enable_grad():
            out = cast(Any, model)(input_ids=ids, attention_mask=att)
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    result: dict[str, torch.Tensor] = {}
    keep = att.bool()
    for s in saes:
        h = captured[s.layer]
        if h.grad is None:
            raise ModelError(
                f"no gradient reached layer {s.layer}; is the model frozen by a no_grad wrapper?"
            )
        x = h.detach()[keep].float()  # (N, d)
        g = h.grad[keep].float()  # (N, d)
        z = s.encode(x)  # (N, d_sae)
        gd = g @ s.W_dec.float().to(g.device).T  # (N, d_sae) = W_dec[f] . grad
        result[s.name] = (gd * z.to(gd.device)).sum(0).cpu()
    model.zero_grad(set_to_none=True)
    return result


def rank_latents(
    source: ActivationSource,
    saes: Sequence[LoadedSAE],
    batches: Sequence[TokenBatch],
    rankings: Sequence[str],
    attribution_model: str = "ft",
    state_path: Path | None = None,
    checkpoint_every: int = 50,
) -> dict[str, dict[str, torch.Tensor]]:
    """{sae name: {score name: (d_sae,)}} over all batches: `mean_diff`, `sae_diff`, `attribution`, plus
    `mean_base` and `mean_ft` (mean latent activations). With `state_path`, the running sums are saved
    every `checkpoint_every` batches and a rerun resumes from there."""
    import torch
    from caft.interp.collect import collect_diffs, load_state, save_state
    from tqdm.auto import tqdm

    layers = sorted({s.layer for s in saes})
    want_attr = "attribution" in rankings and source.is_causal_lm
    if "attribution" in rankings and not source.is_causal_lm:
        log.info("attribution ranking skipped: it needs the next-token loss of a causal LM")
    names = ("mean_base", "mean_ft", "sae_diff", "attribution")
    sums = {s.name: {k: torch.zeros(s.d_sae, dtype=torch.float64) for k in names} for s in saes}
    key = {"saes": [s.name for s in saes], "n_batches": len(batches), "rankings": list(rankings)}
    progress = {"acts": 0, "attr": 0, "n_tokens": 0}
    saved = load_state(state_path) if state_path is not None else None
    if saved is not None and saved.get("key") == key:
        sums, progress = saved["sums"], dict(saved["progress"])

    def checkpoint() -> None:
        if state_path is not None:
            save_state(state_path, {"key": key, "sums": sums, "progress": progress})

    bar = tqdm(total=len(batches), initial=progress["acts"], desc="sae: activations", unit="batch")
    for db in collect_diffs(source, batches[progress["acts"] :], layers):
        progress["n_tokens"] += db.n_tokens
        for s in saes:
            base = db.base[s.layer]
            zb, zf = s.encode(base), s.encode(base + db.diffs[s.layer])
            sums[s.name]["mean_base"] += zb.double().sum(0).cpu()
            sums[s.name]["mean_ft"] += zf.double().sum(0).cpu()
            if "sae_diff" in rankings:
                sums[s.name]["sae_diff"] += s.encode(db.diffs[s.layer]).double().sum(0).cpu()
        progress["acts"] = db.batch.index + 1
        bar.update(progress["acts"] - bar.n)
        if progress["acts"] % checkpoint_every == 0:
            checkpoint()
    progress["acts"] = len(batches)
    bar.close()
    n_tokens = progress["n_tokens"]
    if n_tokens == 0:
        raise DataError("no analysed tokens for the SAE rankings")
    if want_attr:
        which: Which = "ft" if attribution_model == "ft" else "base"
        bar = tqdm(total=len(batches), initial=progress["attr"], desc="sae: attribution", unit="batch")
        for i in range(progress["attr"], len(batches)):
            batch = batches[i]
            if batch.n_selected > 0:
                with source.use(which) as lm:
                    part = attribution_batch(lm.model, lm.sites, saes, batch, lm.device)
                for name, v in part.items():
                    sums[name]["attribution"] += v.double()
            progress["attr"] = i + 1
            bar.update(1)
            if progress["attr"] % checkpoint_every == 0:
                checkpoint()
        bar.close()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for s in saes:
        mb, mf = sums[s.name]["mean_base"] / n_tokens, sums[s.name]["mean_ft"] / n_tokens
        out[s.name] = {"mean_base": mb, "mean_ft": mf, "mean_diff": mf - mb}
        if "sae_diff" in rankings:
            out[s.name]["sae_diff"] = sums[s.name]["sae_diff"] / n_tokens
        if want_attr:
            out[s.name]["attribution"] = sums[s.name]["attribution"]
    return out


def candidates_from_scores(
    sae: LoadedSAE, scores: dict[str, torch.Tensor], rankings: Sequence[str], top_n: int
) -> tuple[list[Candidate], dict[str, torch.Tensor]]:
    """Union of the top-N latents (by |score|) of each ranking; each candidate carries every score."""
    ranks: dict[int, dict[str, int]] = {}
    for r in rankings:
        if r not in scores:
            continue
        v = scores[r].abs()
        n = min(top_n, v.numel())
        for rank, idx in enumerate(v.topk(n).indices.tolist()):
            ranks.setdefault(int(idx), {})[r] = rank
    dirs_all = sae.directions()
    order = sorted(ranks, key=lambda i: (min(ranks[i].values()), i))
    cands: list[Candidate] = []
    dirs: dict[str, torch.Tensor] = {}
    for latent in order:
        cid = candidate_id("sae", sae.layer, latent)
        cands.append(
            Candidate(
                id=cid,
                kind="sae",
                layer=sae.layer,
                index=latent,
                source=f"sae:{sae.name}",
                scores={k: float(v[latent]) for k, v in scores.items()},
                ranks=ranks[latent],
                sae=sae.name,
            )
        )
        dirs[cid] = dirs_all[latent].cpu()
    return cands, dirs


def run_sae_rank(
    cfg: SAEConfig,
    run_dir: str | Path,
    model: ModelConfig | None = None,
    finetuned: ModelConfig | None = None,
    source: ActivationSource | None = None,
) -> Path:
    """The sae stage: load (or train) the SAEs, rank their latents, write `RUN/sae/` candidates."""
    import torch
    from caft.interp.collect import (
        INPUTS_FILE,
        ActivationSource,
        collect_diffs,
        load_examples,
        make_batches,
        prepare_inputs,
        save_examples,
    )
    from caft.interp.pca import _resolve_models

    from caft.rundir import RunDir

    started = time.time()
    run = RunDir(run_dir)
    stage = run.stage("sae")
    if stage.done:
        return stage.path
    stage.ensure()
    if not cfg.saes:
        raise ConfigError(
            "no SAEs: list them in `sae.saes` (source sae_lens, sae_lens_dir, dictionary_learning or train)"
        )
    if source is None:
        base_cfg, ft_cfg = _resolve_models(cfg.model, cfg.finetuned, model, finetuned)
        source = ActivationSource.load(base_cfg, ft_cfg)
    sites = source.sites
    layers = [sites.resolve_layer(s.layer) for s in cfg.saes]
    if len(set(layers)) != len(layers):
        raise ConfigError(f"two SAEs at the same layer ({layers}); rank one SAE per layer")

    if cfg.inputs is not None:
        inputs_path = stage.path / INPUTS_FILE
        if inputs_path.is_file():
            examples = load_examples(inputs_path)
        else:
            examples = prepare_inputs(cfg.inputs, source, stage.path)
            save_examples(inputs_path, examples)
    elif (run.path / "diff" / INPUTS_FILE).is_file():
        examples = load_examples(run.path / "diff" / INPUTS_FILE)
    else:
        raise DataError("no inputs for the SAE rankings: run `caft diff` first or set `sae.inputs`")
    batches = make_batches(examples, cfg.batch_size, source.pad_id)
    device = source.device if cfg.device == "auto" else torch.device(cfg.device)

    loaded: list[LoadedSAE] = []
    to_train = [(spec, layer) for spec, layer in zip(cfg.saes, layers, strict=True) if spec.source == "train"]
    for spec, layer in zip(cfg.saes, layers, strict=True):
        if spec.source != "train":
            s = load_spec(spec, layer).to(device)
            check_site(s, sites.d_model)
            loaded.append(s)
    if to_train:
        trained_root = stage.path / TRAINED_DIR
        need = [
            (spec, layer)
            for spec, layer in to_train
            if not (trained_root / f"L{layer}" / "cfg.json").is_file()
        ]
        acts = _collect_training_acts(
            source, batches, [layer for _, layer in need], cfg.train.max_tokens, collect_diffs
        )
        for spec, layer in to_train:
            folder = trained_root / f"L{layer}"
            name = spec.name or f"trained:L{layer}"
            if (folder / "cfg.json").is_file():
                s = load_sae_lens_dir(folder, layer, name)
            else:
                s = train_sae(acts[layer].to(device), cfg.train, folder, layer, name)
            s.spec = {"source": "sae_lens_dir", "path": str(folder), "layer": layer}
            s.to(device)
            check_site(s, sites.d_model)
            loaded.append(s)

    state_path = stage.path / RANK_STATE
    scores = rank_latents(
        source, loaded, batches, cfg.rankings, cfg.attribution_model, state_path, cfg.checkpoint_every
    )
    cands: list[Candidate] = []
    dirs: dict[str, torch.Tensor] = {}
    for s in loaded:
        c, d = candidates_from_scores(s, scores[s.name], cfg.rankings, cfg.top_n)
        cands += c
        dirs.update(d)
    save_registry(stage.path, loaded)
    save_candidates(stage.path, cands, dirs)
    state_path.unlink(missing_ok=True)
    stage.mark_done(
        {
            "saes": [s.name for s in loaded],
            "layers": [s.layer for s in loaded],
            "n_candidates": len(cands),
            "rankings": list(cfg.rankings),
            "n_examples": len(examples),
            "config": scrub_obj(cfg.model_dump(mode="json")),
        },
        started=started,
    )
    return stage.path


def _collect_training_acts(
    source: ActivationSource, batches: Sequence[TokenBatch], layers: list[int], max_tokens: int, collect: Any
) -> dict[int, torch.Tensor]:
    """Base and fine-tuned activations (together) at `layers`, at most `max_tokens` rows per layer."""
    import torch

    if not layers:
        return {}
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    n = 0
    for db in collect(source, batches, layers):
        for layer in layers:
            b = db.base[layer]
            parts[layer] += [b.cpu(), (b + db.diffs[layer]).cpu()]
        n += 2 * db.n_tokens
        if n >= max_tokens:
            break
    return {layer: torch.cat(parts[layer])[:max_tokens] for layer in layers}
