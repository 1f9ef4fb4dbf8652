"""Evidence dossiers: everything the judge sees about each candidate, built in as few passes as possible.

1. Corpus pass (base model only): residual outputs at every candidate layer; per layer ONE matmul projects
   the batch on all of that layer's candidate directions (SAE latents use their encoder instead); a
   streaming top-k per candidate and sign keeps the max / min windows. The typical residual norm per layer
   (for steering) comes out of the same pass.
2. Difference pass (base and fine-tuned on the diff stage's inputs): mean projection of (ft - base) on each
   candidate, its share of the difference variance, and the tokens where it projects most.
3. Per candidate: logit lens and steered generations (causal LMs), then the dossier file.

Files in `RUN/evidence/`: `corpus_pass.pt` / `diff_pass.pt` (pass results, with a batch counter while
running: the resume points), `dossiers/<id>.json` (one per candidate, written atomically; existing ones are
kept on resume), `DONE.json`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.config import ModelConfig
from caft.env import scrub_obj
from caft.errors import DataError, SiteError
from caft.interp.collect import load_state, save_state
from caft.interp.config import EvidenceConfig
from caft.interp.schema import (
    DOSSIER_DIR,
    Candidate,
    DiffSummary,
    Dossier,
    Generation,
    Steering,
    TokenScore,
    Window,
    dossier_filename,
    load_candidate_set,
    write_dossier,
)

if TYPE_CHECKING:
    import torch

    from caft.interp.collect import ActivationSource, Example, TokenBatch
    from caft.interp.lens import CoherenceCheck
    from caft.interp.sae import LoadedSAE
    from caft.interp.topk import Hit, StreamingTopK

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
    import hashlib

    import torch

    data = v.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def group_by_layer(
    cands: Sequence[Candidate], dirs: dict[str, torch.Tensor], d_model: int, n_layers: int
) -> list[LayerGroup]:
    import torch

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


# ---- persistence of pass results -------------------------------------------------------------------------


def _special_mask(batch: TokenBatch, special_ids: set[int]) -> torch.Tensor:
    import torch

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
    import torch
    from tqdm.auto import tqdm

    from caft.interp.topk import StreamingTopK

    before = (cfg.window * 3) // 4
    after = cfg.window - before - 1
    dev = source.device
    res = CorpusResult(
        {g.layer: StreamingTopK(g.n, cfg.top_k, before, after, 1, dev) for g in groups},
        {g.layer: StreamingTopK(g.n, cfg.top_k, before, after, -1, dev) for g in groups},
        {g.layer: 0.0 for g in groups},
        {g.layer: 0 for g in groups},
    )
    layers = [g.layer for g in groups]
    start = 0
    key = {"layers": layers, "n_batches": len(batches), "ids": _group_ids(groups)}
    saved = load_state(state_path) if state_path is not None else None
    if saved is not None and saved.get("key") == key:
        for g in groups:
            res.maxk[g.layer].load_state_dict(saved["max"][g.layer])
            res.mink[g.layer].load_state_dict(saved["min"][g.layer])
        res.norm_sum = dict(saved["norm_sum"])
        res.norm_count = dict(saved["norm_count"])
        start = int(saved["batches_done"])
    elif saved is not None:
        log.info("corpus pass state in %s was made for other candidates; starting over", state_path)

    def checkpoint(done: int) -> None:
        if state_path is None:
            return
        save_state(
            state_path,
            {
                "key": key,
                "batches_done": done,
                "max": {g.layer: res.maxk[g.layer].state_dict() for g in groups},
                "min": {g.layer: res.mink[g.layer].state_dict() for g in groups},
                "norm_sum": res.norm_sum,
                "norm_count": res.norm_count,
            },
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
    import torch
    from tqdm.auto import tqdm

    from caft.interp.collect import collect_diffs
    from caft.interp.topk import StreamingTopK

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
    saved = load_state(state_path) if state_path is not None else None
    if saved is not None and saved.get("key") == key:
        res.count, res.sum_p, res.sum_p2 = dict(saved["count"]), dict(saved["sum_p"]), dict(saved["sum_p2"])
        res.sum_x, res.sum_x2 = dict(saved["sum_x"]), dict(saved["sum_x2"])
        for g in groups:
            res.pos[g.layer].load_state_dict(saved["pos"][g.layer])
            res.neg[g.layer].load_state_dict(saved["neg"][g.layer])
        start = int(saved["batches_done"])

    def checkpoint(done: int) -> None:
        if state_path is None:
            return
        save_state(
            state_path,
            {
                "key": key,
                "batches_done": done,
                "count": res.count,
                "sum_p": res.sum_p,
                "sum_p2": res.sum_p2,
                "sum_x": res.sum_x,
                "sum_x2": res.sum_x2,
                "pos": {g.layer: res.pos[g.layer].state_dict() for g in groups},
                "neg": {g.layer: res.neg[g.layer].state_dict() for g in groups},
            },
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


# ---- windows and summaries -------------------------------------------------------------------------------


def make_windows(
    hits: list[Hit], sign: str, corpus: list[Example], corpus_docs: list[str], tokenizer: Any, scale: float
) -> list[Window]:
    from caft.interp.lens import token_text

    out: list[Window] = []
    s = 1.0 if sign == "max" else -1.0
    for rank, hit in enumerate(hits):
        ids = corpus[hit.doc].input_ids
        toks: list[str] = []
        vals: list[float] = []
        peak = 0
        for j, v in enumerate(hit.values):
            p = hit.start + j
            if not 0 <= p < len(ids) or math.isnan(v):
                continue
            if p == hit.pos:
                peak = len(toks)
            toks.append(token_text(tokenizer, ids[p]))
            vals.append(round(v, 5))
        scaled = [min(10, max(0, round(10 * s * v / scale))) if scale > 0 else 0 for v in vals]
        out.append(
            Window(
                id=f"ex:{sign}:{rank}",
                sign="max" if sign == "max" else "min",
                doc=corpus_docs[hit.doc],
                tokens=toks,
                values=vals,
                scaled=scaled,
                peak=peak,
                value=round(hit.value, 5),
                position=hit.pos,
            )
        )
    return out


def _token_scores(
    hits: list[Hit], get_batch: Callable[[int], TokenBatch], tokenizer: Any
) -> list[TokenScore]:
    from caft.interp.lens import token_text

    out: list[TokenScore] = []
    for hit in hits:
        batch = get_batch(hit.doc // 1_000_000)
        row = hit.doc % 1_000_000
        ids = batch.input_ids[row].tolist()
        ctx_ids = ids[max(0, hit.pos - 4) : hit.pos + 1]
        out.append(
            TokenScore(
                token=token_text(tokenizer, ids[hit.pos]),
                value=round(hit.value, 5),
                context=tokenizer.decode(ctx_ids),
            )
        )
    return out


# ---- inputs ----------------------------------------------------------------------------------------------


def prepare_corpus(
    cfg: EvidenceConfig, source: ActivationSource, diff_dir: Path | None
) -> tuple[list[Example], str]:
    """The reference corpus (examples keep their original doc ids) and its name for the provenance."""
    from caft.interp.collect import INPUTS_FILE, Example, load_examples, read_examples

    if cfg.corpus is not None:
        raw = read_examples(
            cfg.corpus,
            source.tokenizer,
            prefix="corpus",
            causal=source.is_causal_lm,
            tokens="all",
            max_length=cfg.max_length,
            max_examples=cfg.max_corpus_docs,
            template=source.base.config.chat.template,
        )
        name = cfg.corpus_name or Path(cfg.corpus).name
    elif diff_dir is not None and (diff_dir / INPUTS_FILE).is_file():
        raw = load_examples(diff_dir / INPUTS_FILE)[: cfg.max_corpus_docs]
        raw = [
            Example(e.doc, e.input_ids[: cfg.max_length], [True] * min(len(e.input_ids), cfg.max_length))
            for e in raw
        ]
        name = cfg.corpus_name or "diff-inputs"
    else:
        raise DataError(
            "no reference corpus: set `evidence.corpus` to a JSONL of text (or chat) rows, or run the diff "
            "stage first so that its inputs can serve as the corpus"
        )
    if not raw:
        raise DataError(f"the reference corpus {name!r} is empty (no rows with tokens)")
    return raw, name


# ---- the stage -------------------------------------------------------------------------------------------


def build_dossiers(
    cfg: EvidenceConfig,
    run_dir: str | Path,
    model: ModelConfig | None = None,
    finetuned: ModelConfig | None = None,
    source: ActivationSource | None = None,
    coherence: CoherenceCheck | None = None,
) -> Path:
    """Write `RUN/evidence/dossiers/<id>.json` for every candidate; returns the stage folder.

    Candidates come from `cfg.candidates` or the run's `diff/` and `sae/` stages. Resumable: finished
    passes and dossiers are kept. `coherence` replaces the perplexity proxy of the steering search.
    """
    from caft.interp.collect import INPUTS_FILE, load_examples, make_batches
    from caft.interp.collect import ActivationSource as Source
    from caft.interp.pca import _model_label, _resolve_models
    from caft.rundir import RunDir

    started = time.time()
    run = RunDir(run_dir)
    stage = run.stage("evidence")
    if stage.done:
        return stage.path
    stage.ensure()
    diff_dir = run.path / "diff"
    sae_dir = run.path / "sae"

    paths: list[str | Path] = list(cfg.candidates)
    if not paths:
        paths = [p for p in (diff_dir, sae_dir) if (p / "candidates.jsonl").is_file()]
    if not paths:
        raise DataError(
            f"no candidates in {run.path}: run `caft diff` (and/or `caft sae rank`) first, or list "
            "candidates.jsonl files in `evidence.candidates`"
        )
    cands, dirs = load_candidate_set(paths)
    if not cands:
        raise DataError(f"the candidate files {[str(p) for p in paths]} list no candidates")

    if source is None:
        base_cfg, ft_cfg = _resolve_models(cfg.model, cfg.finetuned, model, finetuned, need_ft=False)
        source = Source.load(base_cfg, ft_cfg)
    sites = source.sites
    groups = group_by_layer(cands, dirs, sites.d_model, sites.n_layers)
    saes = _load_saes(cands, sae_dir, paths, source)

    corpus, corpus_name = prepare_corpus(cfg, source, diff_dir)
    corpus_docs = [e.doc for e in corpus]
    for i, e in enumerate(corpus):
        e.doc = f"corpus:{i}"
    batches = make_batches(corpus, cfg.batch_size, source.pad_id)
    cres = corpus_pass(source, groups, batches, cfg, saes, stage.path / CORPUS_PASS)

    dres: DiffResult | None = None
    get_batch: Callable[[int], TokenBatch] = _no_batch
    if cfg.diff_summary and source.has_ft and (diff_dir / INPUTS_FILE).is_file():
        dex = load_examples(diff_dir / INPUTS_FILE)[: cfg.diff_max_examples]
        dbatches = make_batches(dex, cfg.batch_size, source.pad_id)
        get_batch = functools.lru_cache(maxsize=256)(dbatches.__getitem__)
        dres = diff_pass(source, groups, dbatches, cfg, stage.path / DIFF_PASS)

    steerer: _Steerer | None = None
    out_dir = stage.path / DOSSIER_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    n_tokens = sum(len(e.input_ids) for e in corpus)
    written = 0
    from tqdm.auto import tqdm

    todo = [(g, col, c) for g in groups for col, c in enumerate(g.candidates)]
    for g, col, c in tqdm(todo, desc="evidence: dossiers", unit="candidate"):
        path = out_dir / dossier_filename(c.id)
        digest = direction_digest(g.directions[:, col])
        if path.is_file() and _dossier_digest(path) == digest:
            continue
        maxh = cres.maxk[g.layer].hits(col)
        minh = [] if c.kind == "sae" else cres.mink[g.layer].hits(col)
        scale = max([abs(h.value) for h in maxh + minh] + [0.0])
        direction = g.directions[:, col]
        dossier = Dossier(
            candidate=c,
            provenance={
                "base": source.base.config.name_or_path,
                "finetuned": _model_label(source),
                "layer": c.layer,
                "kind": c.kind,
                "source": c.source,
                "scores": c.scores,
                "ranks": c.ranks,
                "corpus": corpus_name,
                "corpus_docs": len(corpus),
                "corpus_tokens": n_tokens,
                "activation": "sae_encoder" if c.kind == "sae" and c.sae in (saes or {}) else "projection",
                "residual_norm": cres.residual_norm(g.layer),
                "direction_digest": digest,
            },
            max_examples=make_windows(maxh, "max", corpus, corpus_docs, source.tokenizer, scale),
            min_examples=make_windows(minh, "min", corpus, corpus_docs, source.tokenizer, scale),
        )
        if dres is not None:
            mean_p, share, n = dres.summary_numbers(g.layer, col)
            top = _token_scores(dres.pos[g.layer].hits(col), get_batch, source.tokenizer)
            top += _token_scores(dres.neg[g.layer].hits(col), get_batch, source.tokenizer)
            dossier.diff = DiffSummary(
                mean_projection=mean_p, variance_share=share, n_tokens=n, top_tokens=top
            )
        if cfg.logit_lens and source.is_causal_lm:
            from caft.interp.lens import logit_lens

            with source.use("base") as lm:
                dossier.logit_lens = logit_lens(lm, direction, cfg.lens_tokens)
        if cfg.steering.enabled and source.is_causal_lm:
            if steerer is None:  # unsteered generations are made once, and only when a dossier needs them
                steerer = _Steerer(cfg, source, coherence)
            dossier.steering = steerer.run(g.layer, direction, cres.residual_norm(g.layer))
        write_dossier(path, dossier)
        written += 1
    stage.mark_done(
        {
            "n_dossiers": len(todo),
            "written_now": written,
            "corpus": corpus_name,
            "corpus_docs": len(corpus),
            "corpus_tokens": n_tokens,
            "layers": [g.layer for g in groups],
            "config": scrub_obj(cfg.model_dump(mode="json")),
        },
        started=started,
    )
    return stage.path


def _dossier_digest(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    digest = data.get("provenance", {}).get("direction_digest")
    return str(digest) if digest is not None else None


def _no_batch(i: int) -> TokenBatch:
    raise RuntimeError(f"no difference batches were made (asked for batch {i})")


def _load_saes(
    cands: list[Candidate], sae_dir: Path, paths: Sequence[str | Path], source: ActivationSource
) -> dict[str, LoadedSAE] | None:
    names = {c.sae for c in cands if c.kind == "sae" and c.sae}
    if not names:
        return None
    from caft.interp.sae import load_registry

    folders = [sae_dir] + [Path(p) if Path(p).is_dir() else Path(p).parent for p in paths]
    for folder in folders:
        if (folder / "saes.json").is_file():
            reg = load_registry(folder, device=source.device)
            missing = names - set(reg)
            if missing:
                raise DataError(f"{folder}/saes.json has no SAE named {sorted(missing)}")
            return reg
    log.warning("no saes.json found: SAE latents are read as projections on their decoder directions")
    return None


class _Steerer:
    """Steered generations for one candidate at a time; unsteered generations are made once."""

    def __init__(
        self, cfg: EvidenceConfig, source: ActivationSource, coherence: CoherenceCheck | None
    ) -> None:
        from caft.interp.lens import PerplexityCoherence, mean_log_perplexity

        self.cfg = cfg.steering
        self.seed = cfg.seed
        self.source = source
        self.prompts = list(self.cfg.prompts)
        self.models = [m for m in self.cfg.models if m == "base" or source.has_ft]
        self.unsteered = {m: self._generate(m, None) for m in self.models}
        base_ppl = self.score(self.prompts, self.unsteered["base"]) if "base" in self.unsteered else [1.0]
        self.baseline = mean_log_perplexity(base_ppl)
        if not math.isfinite(self.baseline):
            self.baseline = 1.0
        self.unsteered_ppl = {m: self.score(self.prompts, t) for m, t in self.unsteered.items()}
        self.coherent = coherence or PerplexityCoherence(
            self.score, self.baseline, self.cfg.max_perplexity_ratio
        )

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
        from caft.interp.lens import answer_perplexity

        with self.source.use("base") as lm:
            return answer_perplexity(lm, prompts, texts)

    def _generate(self, which: str, vec: tuple[int, torch.Tensor] | None) -> list[str]:
        from caft.interp.lens import steer
        from caft.models import generate_chat

        convs = [[{"role": "user", "content": p}] for p in self.prompts]
        with self.source.use("base" if which == "base" else "ft") as lm:
            if vec is None:
                return generate_chat(lm, convs, self.cfg.max_new_tokens, temperature=0.0, seed=self.seed)
            with steer(lm.model, lm.sites, vec[0], vec[1]):
                return generate_chat(lm, convs, self.cfg.max_new_tokens, temperature=0.0, seed=self.seed)

    def run(self, layer: int, direction: torch.Tensor, residual_norm: float) -> Steering:
        from caft.interp.lens import search_alpha

        unit = direction / direction.norm()
        rn = residual_norm if residual_norm > 0 else 1.0

        def gen_base(alpha: float) -> list[str]:
            return self._generate("base", (layer, alpha * rn * unit))

        alpha, trace = search_alpha(
            gen_base,
            self.coherent,
            self.prompts,
            self.cfg.alpha_min,
            self.cfg.alpha_max,
            self.cfg.search_steps,
        )
        gens: list[Generation] = []
        for m in self.models:
            for sign, a in (("0", 0.0), ("+", alpha), ("-", -alpha)):
                texts = self.unsteered[m] if sign == "0" else self._generate(m, (layer, a * rn * unit))
                ppl = self.unsteered_ppl[m] if sign == "0" else self.score(self.prompts, texts)
                for i, (p, t) in enumerate(zip(self.prompts, texts, strict=True)):
                    gens.append(
                        Generation(
                            id=f"steer:{m}:{sign}:{i}",
                            model="base" if m == "base" else "ft",
                            prompt=p,
                            alpha=a,
                            text=t,
                            perplexity=ppl[i] if math.isfinite(ppl[i]) else None,
                        )
                    )
        return Steering(
            alpha=alpha, residual_norm=rn, generations=gens, search=trace, baseline_perplexity=self.baseline
        )
