"""The two passes of the evidence stage, each one forward sweep with a resumable state.

1. Corpus pass (base model only): residual outputs at every candidate layer; per layer ONE matmul projects
   the batch on all of that layer's candidate directions (SAE latents use their encoder instead); a
   streaming top-k per candidate and sign keeps the max / min windows. The typical residual norm per layer
   (for steering) comes out of the same pass.
2. Difference pass (base and fine-tuned on the diff stage's inputs): mean projection of (ft - base) on each
   candidate, its share of the difference variance, and the tokens where it projects most.

A pass state (`corpus_pass.pt`, `diff_pass.pt`) is saved every `checkpoint_every` batches and once more when
the pass ends; it is reused only for the same candidates and directions.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from caft.errors import DataError, SiteError
from caft.interp.collect import PassState, collect_diffs
from caft.interp.config import EvidenceConfig
from caft.interp.inputs import TokenBatch
from caft.interp.sae_load import LoadedSAE
from caft.interp.schema import Candidate
from caft.interp.source import ActivationSource
from caft.interp.topk import StreamingTopK

log = logging.getLogger(__name__)

CORPUS_PASS = "corpus_pass.pt"
DIFF_PASS = "diff_pass.pt"


# ---- candidates grouped by layer -------------------------------------------------------------------------


@dataclass
class LayerGroup:
    """The candidates of one layer, in the column order of the projection matrix."""

    layer: int
    candidates: list[Candidate]
    directions: torch.Tensor  # (d, C) unit columns, float32
    sae_columns: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """SAE name -> [(column, latent)] for columns read from an SAE encoder instead of a projection."""

    @property
    def n(self) -> int:
        return len(self.candidates)


def direction_digest(v: torch.Tensor) -> str:
    """Short content hash of a direction: a dossier or pass state made for another direction is stale."""
    data = v.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def group_by_layer(
    cands: Sequence[Candidate], dirs: dict[str, torch.Tensor], d_model: int, n_layers: int
) -> list[LayerGroup]:
    groups: dict[int, list[Candidate]] = {}
    for c in cands:
        if not 0 <= c.layer < n_layers:
            raise SiteError(
                f"candidate {c.id} is at layer {c.layer}, out of range for this model "
                f"(layers 0..{n_layers - 1}); were the candidates made with another model?"
            )
        v = dirs[c.id]
        if v.shape != (d_model,):
            raise DataError(
                f"candidate {c.id} has a direction of shape {tuple(v.shape)}, but the model's d_model is "
                f"{d_model}; were the candidates made with another model?"
            )
        if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0:
            raise DataError(f"candidate {c.id} has a zero or non-finite direction")
        groups.setdefault(c.layer, []).append(c)
    out: list[LayerGroup] = []
    for layer in sorted(groups):
        cs = groups[layer]
        mat = torch.stack([dirs[c.id].float() / dirs[c.id].float().norm() for c in cs], dim=1)  # (d, C)
        g = LayerGroup(layer, cs, mat)
        for col, c in enumerate(cs):
            if c.kind == "sae" and c.sae:
                g.sae_columns.setdefault(c.sae, []).append((col, c.index))
        out.append(g)
    return out


def project(group: LayerGroup, h: torch.Tensor, saes: dict[str, LoadedSAE] | None = None) -> torch.Tensor:
    """(..., d) activations -> (..., C) values for all candidates of the group: one matmul, then SAE
    latents overwritten by their encoder activation."""
    flat = h.reshape(-1, h.shape[-1]).float()
    vals = flat @ group.directions.to(flat.device)  # (N, C)
    for name, cols in group.sae_columns.items():
        if saes is None or name not in saes:
            continue
        acts = saes[name].encode(flat)  # (N, d_sae)
        col_idx = [c for c, _ in cols]
        lat_idx = [lat for _, lat in cols]
        vals[:, col_idx] = acts[:, lat_idx].to(vals.dtype)
    return vals.reshape(*h.shape[:-1], group.n)


def _special_mask(batch: TokenBatch, special_ids: set[int]) -> torch.Tensor:
    if not special_ids:
        return torch.zeros_like(batch.select)
    ids = torch.tensor(sorted(special_ids), dtype=batch.input_ids.dtype)
    return torch.isin(batch.input_ids, ids)


# ---- pass 1: the reference corpus ------------------------------------------------------------------------


@dataclass
class CorpusResult:
    maxk: dict[int, StreamingTopK]
    mink: dict[int, StreamingTopK]
    norm_sum: dict[int, float]
    norm_count: dict[int, int]

    def residual_norm(self, layer: int) -> float:
        n = self.norm_count.get(layer, 0)
        return self.norm_sum[layer] / n if n else 0.0


def corpus_pass(
    source: ActivationSource,
    groups: list[LayerGroup],
    batches: Sequence[TokenBatch],
    cfg: EvidenceConfig,
    saes: dict[str, LoadedSAE] | None,
    state_path: Path | None,
) -> CorpusResult:
    """Max/min windows per candidate and residual norms per layer over the corpus (base model)."""
    before = (cfg.window - 1) // 2  # the peak centred: as much context after it as before
    after = cfg.window - before - 1
    k = gathered_k(cfg)
    dev = source.device
    res = CorpusResult(
        {g.layer: StreamingTopK(g.n, k, before, after, 1, dev) for g in groups},
        {g.layer: StreamingTopK(g.n, k, before, after, -1, dev) for g in groups},
        {g.layer: 0.0 for g in groups},
        {g.layer: 0 for g in groups},
    )
    layers = [g.layer for g in groups]
    start = 0
    key = {
        "layers": layers,
        "n_batches": len(batches),
        "ids": _group_ids(groups),
        "k": k,
        "window": [before, after],
    }
    state = PassState(state_path, key, "corpus pass")
    saved = state.resume()
    if saved is not None:
        for g in groups:
            res.maxk[g.layer].load_state_dict(saved["max"][g.layer])
            res.mink[g.layer].load_state_dict(saved["min"][g.layer])
        res.norm_sum = dict(saved["norm_sum"])
        res.norm_count = dict(saved["norm_count"])
        start = int(saved["batches_done"])

    def checkpoint(done: int) -> None:
        state.save(
            batches_done=done,
            max={g.layer: res.maxk[g.layer].state_dict() for g in groups},
            min={g.layer: res.mink[g.layer].state_dict() for g in groups},
            norm_sum=res.norm_sum,
            norm_count=res.norm_count,
        )

    special = set(source.tokenizer.all_special_ids)
    bar = tqdm(total=len(batches), initial=start, desc="evidence: corpus", unit="batch")
    for batch in batches[start:]:
        hidden = source.hidden("base", batch, layers)
        valid = batch.attention_mask.bool().to(dev)
        peak_ok = batch.select & ~_special_mask(batch, special)
        peak_ok[:, : cfg.skip_first] = False
        peak_ok = peak_ok.to(dev)
        doc_idx = torch.tensor([int(d) for d in _doc_numbers(batch)], device=dev)
        for g in groups:
            h = hidden[g.layer]
            vals = project(g, h, saes)  # (B, T, C)
            res.maxk[g.layer].update(vals, valid, doc_idx, peak_ok)
            res.mink[g.layer].update(vals, valid, doc_idx, peak_ok)
            norms = h.float().norm(dim=-1)[peak_ok]
            res.norm_sum[g.layer] += float(norms.sum())
            res.norm_count[g.layer] += int(norms.numel())
        bar.update(1)
        done = batch.index + 1
        if done % cfg.checkpoint_every == 0 and done < len(batches):
            checkpoint(done)
    bar.close()
    checkpoint(len(batches))
    return res


def gathered_k(cfg: EvidenceConfig) -> int:
    """Windows gathered per candidate and sign: twice `top_k` when near-duplicates are dropped afterwards."""
    return cfg.top_k * 2 if cfg.dedupe else cfg.top_k


def _group_ids(groups: list[LayerGroup]) -> list[str]:
    """Candidate ids with their direction digests (pass states are reused only for the same directions)."""
    return [
        f"{c.id}@{direction_digest(g.directions[:, i])}" for g in groups for i, c in enumerate(g.candidates)
    ]


def _doc_numbers(batch: TokenBatch) -> list[int]:
    """Corpus indices of the batch rows (docs are numbered `corpus:<i>` by `prepare_corpus`)."""
    return [int(d.rsplit(":", 1)[1]) for d in batch.docs]


# ---- pass 2: differences ---------------------------------------------------------------------------------


@dataclass
class DiffResult:
    count: dict[int, int]
    sum_p: dict[int, torch.Tensor]  # (C,)
    sum_p2: dict[int, torch.Tensor]  # (C,)
    sum_x: dict[int, torch.Tensor]  # (d,)
    sum_x2: dict[int, float]
    pos: dict[int, StreamingTopK]
    neg: dict[int, StreamingTopK]

    def summary_numbers(self, layer: int, col: int) -> tuple[float, float, int]:
        n = self.count[layer]
        if n == 0:
            return 0.0, 0.0, 0
        mean_p = float(self.sum_p[layer][col]) / n
        var_p = float(self.sum_p2[layer][col]) / n - mean_p**2
        mu = self.sum_x[layer] / n
        total = self.sum_x2[layer] / n - float(mu @ mu)
        share = max(0.0, var_p) / total if total > 0 else 0.0
        return mean_p, share, n


def diff_pass(
    source: ActivationSource,
    groups: list[LayerGroup],
    batches: Sequence[TokenBatch],
    cfg: EvidenceConfig,
    state_path: Path | None,
) -> DiffResult:
    """(ft - base) projected on every candidate direction over the diff inputs (one matmul per layer).
    Checkpointed every `cfg.checkpoint_every` batches; a finished pass is loaded, not redone."""
    dev = source.device
    d = source.sites.d_model
    layers = [g.layer for g in groups]
    key = {"layers": layers, "n_batches": len(batches), "ids": _group_ids(groups)}
    res = DiffResult(
        {g.layer: 0 for g in groups},
        {g.layer: torch.zeros(g.n, dtype=torch.float64) for g in groups},
        {g.layer: torch.zeros(g.n, dtype=torch.float64) for g in groups},
        {g.layer: torch.zeros(d, dtype=torch.float64) for g in groups},
        {g.layer: 0.0 for g in groups},
        {g.layer: StreamingTopK(g.n, cfg.top_tokens, 4, 0, 1, dev) for g in groups},
        {g.layer: StreamingTopK(g.n, cfg.top_tokens, 4, 0, -1, dev) for g in groups},
    )
    start = 0
    state = PassState(state_path, key, "difference pass")
    saved = state.resume()
    if saved is not None:
        res.count, res.sum_p, res.sum_p2 = dict(saved["count"]), dict(saved["sum_p"]), dict(saved["sum_p2"])
        res.sum_x, res.sum_x2 = dict(saved["sum_x"]), dict(saved["sum_x2"])
        for g in groups:
            res.pos[g.layer].load_state_dict(saved["pos"][g.layer])
            res.neg[g.layer].load_state_dict(saved["neg"][g.layer])
        start = int(saved["batches_done"])

    def checkpoint(done: int) -> None:
        state.save(
            batches_done=done,
            count=res.count,
            sum_p=res.sum_p,
            sum_p2=res.sum_p2,
            sum_x=res.sum_x,
            sum_x2=res.sum_x2,
            pos={g.layer: res.pos[g.layer].state_dict() for g in groups},
            neg={g.layer: res.neg[g.layer].state_dict() for g in groups},
        )

    if start >= len(batches):
        return res
    bar = tqdm(total=len(batches), initial=start, desc="evidence: differences", unit="batch")
    for db in collect_diffs(source, batches[start:], layers):
        B, T = db.batch.input_ids.shape
        valid = db.batch.select.to(dev)
        docs = torch.arange(B, device=dev) + db.batch.index * 1_000_000  # batch-local ids, decoded below
        for g in groups:
            x = db.diffs[g.layer]  # (N, d)
            p = x @ g.directions.to(x.device)  # (N, C)
            res.count[g.layer] += int(x.shape[0])
            res.sum_p[g.layer] += p.double().sum(0).cpu()
            res.sum_p2[g.layer] += p.double().pow(2).sum(0).cpu()
            res.sum_x[g.layer] += x.double().sum(0).cpu()
            res.sum_x2[g.layer] += float(x.double().pow(2).sum())
            full = torch.zeros(B, T, g.n, device=dev)
            full[db.rows, db.cols] = p
            res.pos[g.layer].update(full, valid, docs)
            res.neg[g.layer].update(full, valid, docs)
        bar.update(db.batch.index + 1 - bar.n)
        done = db.batch.index + 1
        if done % cfg.checkpoint_every == 0 and done < len(batches):
            checkpoint(done)
    bar.close()
    checkpoint(len(batches))
    return res
