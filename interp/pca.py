"""Streaming PCA on activation differences, and the `diff` stage that runs it.

Per layer we keep, in float64, the token count n, the sum s (d) and the second moment M = sum x x^T (d x d)
of the differences x = ft - base. The covariance is C = M/n - (s/n)(s/n)^T; its top eigenvectors are the
PCs. Memory is O(layers x d^2) whatever the number of tokens.

Files written by `run_diff` into `RUN/diff/`:
    inputs.jsonl            the analysed token sequences (reused by `sae` and `evidence`)
    generations.jsonl       sampled answers of the fine-tuned model (when `inputs.generate`)
    state.safetensors/.json running moments + batches done (the resume point)
    moments.safetensors     final moments per layer (n, sum, second moment)
    candidates.jsonl        PCs and mean-difference vectors (`caft.interp.schema.Candidate`)
    directions.safetensors  their unit directions
    DONE.json
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from caft.config import ModelConfig
from caft.env import scrub_obj
from caft.errors import ConfigError, DataError, RunDirError
from caft.interp.answers import check_inputs, prepare_inputs
from caft.interp.collect import collect_diffs
from caft.interp.config import DiffConfig
from caft.interp.inputs import INPUTS_FILE, load_examples, make_batches, save_examples
from caft.interp.schema import Candidate, candidate_id, save_candidates
from caft.interp.source import ActivationSource, default_layers, model_label, resolve_models
from caft.rundir import RunDir, atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"
MOMENTS_FILE = "moments.safetensors"


@dataclass
class LayerPCA:
    """The result for one layer: eigenvalues (descending), eigenvectors as columns, the mean difference."""

    layer: int
    n: int
    mean: torch.Tensor  # (d,) float64
    eigenvalues: torch.Tensor  # (k,) float64
    components: torch.Tensor  # (d, k) float64, unit columns
    total_variance: float

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        if self.total_variance <= 0:
            return self.eigenvalues * 0
        return self.eigenvalues / self.total_variance


class StreamingDiffPCA:
    """Running float64 moments of per-token difference vectors, per layer."""

    def __init__(self, layers: list[int], d_model: int, device: str | torch.device = "cpu") -> None:
        self.layers = list(layers)
        self.d_model = d_model
        self.device = torch.device(device)
        self.count: dict[int, int] = dict.fromkeys(self.layers, 0)
        self.sum = {
            layer: torch.zeros(d_model, dtype=torch.float64, device=self.device) for layer in self.layers
        }
        self.m2 = {
            layer: torch.zeros(d_model, d_model, dtype=torch.float64, device=self.device)
            for layer in self.layers
        }

    def update(self, layer: int, x: torch.Tensor) -> None:
        """Add rows of `x` (N, d) to the moments of `layer`."""
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"expected (N, {self.d_model}) differences, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"non-finite activation differences at layer {layer}; use float32 weights")
        x64 = x.to(device=self.device, dtype=torch.float64)
        self.count[layer] += int(x.shape[0])
        self.sum[layer] += x64.sum(0)
        self.m2[layer].addmm_(x64.T, x64)

    def mean(self, layer: int) -> torch.Tensor:
        n = self.count[layer]
        if n == 0:
            raise DataError(f"no tokens were collected for layer {layer}")
        return self.sum[layer] / n

    def covariance(self, layer: int) -> torch.Tensor:
        """Population covariance (divides by n), symmetrised."""
        n = self.count[layer]
        mu = self.mean(layer)
        cov = self.m2[layer] / n - torch_outer(mu, mu)
        return (cov + cov.T) / 2

    def result(self, layer: int, k: int) -> LayerPCA:
        cov = self.covariance(layer)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        k = min(k, self.d_model)
        idx = torch.arange(self.d_model - 1, self.d_model - 1 - k, -1, device=evals.device)
        vals = evals[idx].clamp_min(0)
        vecs = evecs[:, idx]
        # Fix each eigenvector's sign so that results are reproducible: largest |entry| positive.
        pivot = vecs.abs().argmax(0)
        signs = torch.sign(vecs[pivot, torch.arange(k, device=vecs.device)])
        signs[signs == 0] = 1
        vecs = vecs * signs
        total = float(torch.diagonal(cov).sum().clamp_min(0))
        return LayerPCA(layer, self.count[layer], self.mean(layer), vals, vecs, total)

    # ---- persistence (resume) -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            out[f"count.{layer}"] = torch.tensor([self.count[layer]], dtype=torch.int64)
            out[f"sum.{layer}"] = self.sum[layer].cpu()
            out[f"m2.{layer}"] = self.m2[layer].cpu()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for layer in self.layers:
            try:
                self.count[layer] = int(state[f"count.{layer}"][0])
                self.sum[layer] = state[f"sum.{layer}"].to(self.device, copy=True)
                self.m2[layer] = state[f"m2.{layer}"].to(self.device, copy=True)
            except KeyError as e:
                raise RunDirError(f"saved PCA state has no entry {e} (it was made with other layers)") from e
            if self.sum[layer].shape != (self.d_model,):
                raise RunDirError(
                    f"saved PCA state has d_model {self.sum[layer].shape[0]}, not {self.d_model}"
                )

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, save(self.state_dict()))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> StreamingDiffPCA:
        """Moments saved by `save` (e.g. the diff stage's `moments.safetensors`)."""
        state = load_file(str(path))
        layers = sorted(int(k.split(".", 1)[1]) for k in state if k.startswith("count."))
        if not layers:
            raise RunDirError(f"{path} holds no PCA moments")
        d = int(state[f"sum.{layers[0]}"].shape[0])
        pca = cls(layers, d, device)
        pca.load_state_dict(state)
        return pca


def torch_outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[:, None] * b[None, :]


# ---- the stage -------------------------------------------------------------------------------------------


def candidates_from_pca(
    results: list[LayerPCA], include_mean: bool
) -> tuple[list[Candidate], dict[str, torch.Tensor]]:
    """PC and mean-vector candidates with their scores and unit directions."""

    cands: list[Candidate] = []
    dirs: dict[str, torch.Tensor] = {}
    for res in results:
        ratios = res.explained_variance_ratio
        for i in range(res.components.shape[1]):
            cid = candidate_id("pc", res.layer, i)
            cands.append(
                Candidate(
                    id=cid,
                    kind="pc",
                    layer=res.layer,
                    index=i,
                    source="pca",
                    scores={
                        "eigenvalue": float(res.eigenvalues[i]),
                        "explained_variance_ratio": float(ratios[i]),
                    },
                    ranks={"explained_variance": i},
                )
            )
            dirs[cid] = res.components[:, i].float()
        if include_mean:
            norm = float(res.mean.norm())
            if norm > 0:
                cid = candidate_id("vector", res.layer, "mean")
                unit = res.mean / norm
                cands.append(
                    Candidate(
                        id=cid,
                        kind="vector",
                        layer=res.layer,
                        index=0,
                        source="mean_diff",
                        scores={"mean_norm": norm},
                    )
                )
                dirs[cid] = unit.float()
    return cands, dirs


def run_diff(
    cfg: DiffConfig,
    run_dir: str | Path,
    model: ModelConfig | None = None,
    finetuned: ModelConfig | None = None,
    source: ActivationSource | None = None,
) -> Path:
    """The diff stage: collect (ft - base) on the inputs, stream the moments, write the candidates.

    Resumes from the last saved batch; a finished stage (DONE.json) is returned as is. `source` (an
    `ActivationSource`) may be passed to reuse models already in memory. Returns the stage folder.
    """
    started = time.time()
    stage = RunDir(run_dir).stage("diff")
    if stage.done:
        log.info("diff stage already done: %s", stage.path)
        return stage.path
    stage.ensure()
    if not (stage.path / INPUTS_FILE).is_file():
        check_inputs(cfg.inputs)  # bad data fails before the models load
    if source is None:
        base_cfg, ft_cfg = resolve_models(cfg.model, cfg.finetuned, model, finetuned)
        source = ActivationSource.load(base_cfg, ft_cfg)
    if not source.has_ft:
        raise ConfigError("the diff stage needs a fine-tuned model (`finetuned`)")
    sites = source.sites
    layers = sites.check_layers(cfg.layers if cfg.layers is not None else default_layers(sites.n_layers))

    inputs_path = stage.path / INPUTS_FILE
    if inputs_path.is_file():
        examples = load_examples(inputs_path)
    else:
        examples = prepare_inputs(cfg.inputs, source, stage.path, cfg.seed)
        save_examples(inputs_path, examples)
    batches = make_batches(examples, cfg.batch_size, source.pad_id)

    pca = StreamingDiffPCA(layers, sites.d_model, source.device)
    meta_path, state_path = stage.path / STATE_META, stage.path / STATE_TENSORS
    start = 0
    if meta_path.is_file() and state_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("layers") != layers or meta.get("n_batches") != len(batches):
            raise RunDirError(
                f"{stage.path} holds a partial diff for layers {meta.get('layers')} over "
                f"{meta.get('n_batches')} batches, but this run asks for layers {layers} over {len(batches)} "
                "batches: delete the diff folder to start over, or restore the earlier settings"
            )
        pca.load_state_dict(load_file(str(state_path)))
        start = int(meta["batches_done"])
        log.info("resuming the diff stage at batch %d of %d", start, len(batches))

    def checkpoint(done: int) -> None:
        pca.save(state_path)  # tensors first: the meta names the batch count they hold
        atomic_write_json(meta_path, {"layers": layers, "n_batches": len(batches), "batches_done": done})

    n_tokens = batches.n_selected
    bar = tqdm(total=len(batches), initial=start, desc="diff: collect + PCA", unit="batch")
    done = start
    for db in collect_diffs(source, batches[start:], layers):
        for layer in layers:
            pca.update(layer, db.diffs[layer])
        done = db.batch.index + 1
        bar.update(done - bar.n)
        if done % cfg.checkpoint_every == 0 and done < len(batches):
            checkpoint(done)
    bar.update(len(batches) - bar.n)
    bar.close()
    if any(pca.count[layer] == 0 for layer in layers):
        raise DataError("no analysed tokens in the inputs (every example was empty after masking)")

    results = [pca.result(layer, cfg.n_components) for layer in layers]
    cands, dirs = candidates_from_pca(results, cfg.include_mean)
    pca.save(stage.path / MOMENTS_FILE)
    save_candidates(stage.path, cands, dirs)
    for p in (meta_path, state_path):
        p.unlink(missing_ok=True)
    info = {
        "layers": layers,
        "n_examples": len(examples),
        "n_tokens": n_tokens,
        "n_candidates": len(cands),
        "d_model": sites.d_model,
        "base": source.base.config.name_or_path,
        "finetuned": model_label(source),
        "top_ratio": {str(r.layer): float(r.explained_variance_ratio[0]) for r in results},
        "config": scrub_obj(cfg.model_dump(mode="json")),
    }
    stage.mark_done(info, started=started)
    return stage.path
