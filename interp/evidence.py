"""The evidence stage: everything the judge sees about each candidate, one JSON dossier per candidate.

1. The corpus pass and the difference pass (`caft.interp.evidence_passes`): max / min windows, residual
   norms, and how (ft - base) moves along each candidate.
2. Per candidate: logit lens and steered generations (causal LMs, `caft.interp.steering`), then the
   dossier file.

Files in `RUN/evidence/`: `corpus_pass.pt` / `diff_pass.pt` (pass results, with a batch counter while
running: the resume points), `dossiers/<id>.json` (one per candidate, written atomically; existing ones are
kept on resume), `DONE.json`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from caft.config import ModelConfig
from caft.env import scrub_obj
from caft.errors import ConfigError, DataError
from caft.interp.coherence import CoherenceCheck
from caft.interp.config import EvidenceConfig
from caft.interp.evidence_passes import (
    CORPUS_PASS,
    DIFF_PASS,
    CorpusResult,
    DiffResult,
    LayerGroup,
    corpus_pass,
    diff_pass,
    direction_digest,
    group_by_layer,
)
from caft.interp.inputs import INPUTS_FILE, Example, TokenBatch, load_examples, make_batches, read_examples
from caft.interp.lens import logit_lens, token_text
from caft.interp.sae_load import REGISTRY_FILE, LoadedSAE, load_registry
from caft.interp.schema import (
    Candidate,
    DiffSummary,
    Dossier,
    TokenScore,
    Window,
    dossier_digest,
    dossier_filename,
    load_candidate_set,
    write_dossier,
)
from caft.interp.source import ActivationSource, model_label, resolve_models
from caft.interp.steering import Steerer
from caft.interp.topk import Hit
from caft.rundir import CANDIDATES_FILE, DOSSIER_DIR, RunDir

log = logging.getLogger(__name__)


# ---- windows and summaries -------------------------------------------------------------------------------


def make_windows(
    hits: list[Hit], sign: str, corpus: list[Example], corpus_docs: list[str], tokenizer: Any, scale: float
) -> list[Window]:
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


def _candidate_paths(cfg: EvidenceConfig, run: RunDir) -> list[str | Path]:
    paths: list[str | Path] = list(cfg.candidates)
    if not paths:
        paths = list(run.layout.candidate_dirs())
    if not paths:
        raise DataError(
            f"no candidates in {run.path}: run `caft diff` (and/or `caft sae rank`) first, or list "
            f"{CANDIDATES_FILE} files in `evidence.candidates`"
        )
    return paths


def _load_saes(
    cands: list[Candidate], sae_dir: Path, paths: Sequence[str | Path], source: ActivationSource
) -> dict[str, LoadedSAE] | None:
    names = {c.sae for c in cands if c.kind == "sae" and c.sae}
    if not names:
        return None
    folders = [sae_dir] + [Path(p) if Path(p).is_dir() else Path(p).parent for p in paths]
    for folder in folders:
        if (folder / REGISTRY_FILE).is_file():
            reg = load_registry(folder, device=source.device)
            missing = names - set(reg)
            if missing:
                raise DataError(f"{folder / REGISTRY_FILE} has no SAE named {sorted(missing)}")
            return reg
    log.warning("no %s found: SAE latents are read as projections on their decoder directions", REGISTRY_FILE)
    return None


def _no_batch(i: int) -> TokenBatch:
    raise RuntimeError(f"no difference batches were made (asked for batch {i})")


# ---- the stage -------------------------------------------------------------------------------------------


class _Assembler:
    """Everything shared by the dossiers of one stage run: the pass results, the corpus, the steerer."""

    def __init__(
        self,
        cfg: EvidenceConfig,
        source: ActivationSource,
        corpus: list[Example],
        corpus_docs: list[str],
        provenance: dict[str, Any],
        saes: dict[str, LoadedSAE] | None,
        cres: CorpusResult,
        dres: DiffResult | None,
        get_batch: Callable[[int], TokenBatch],
        coherence: CoherenceCheck | None,
    ) -> None:
        self.cfg, self.source, self.saes = cfg, source, saes
        self.corpus, self.corpus_docs, self.provenance = corpus, corpus_docs, provenance
        self.cres, self.dres, self.get_batch = cres, dres, get_batch
        self.coherence = coherence
        self.steerer: Steerer | None = None

    def dossier(self, g: LayerGroup, col: int, c: Candidate, digest: str) -> Dossier:
        cres, tok = self.cres, self.source.tokenizer
        maxh = cres.maxk[g.layer].hits(col)
        minh = [] if c.kind == "sae" else cres.mink[g.layer].hits(col)
        scale = max([abs(h.value) for h in maxh + minh] + [0.0])
        direction = g.directions[:, col]
        dossier = Dossier(
            candidate=c,
            provenance={
                "base": self.source.base.config.name_or_path,
                "finetuned": model_label(self.source),
                "layer": c.layer,
                "kind": c.kind,
                "source": c.source,
                "scores": c.scores,
                "ranks": c.ranks,
                **self.provenance,
                "activation": "sae_encoder"
                if c.kind == "sae" and c.sae in (self.saes or {})
                else "projection",
                "residual_norm": cres.residual_norm(g.layer),
                "direction_digest": digest,
            },
            max_examples=make_windows(maxh, "max", self.corpus, self.corpus_docs, tok, scale),
            min_examples=make_windows(minh, "min", self.corpus, self.corpus_docs, tok, scale),
        )
        if self.dres is not None:
            mean_p, share, n = self.dres.summary_numbers(g.layer, col)
            top = _token_scores(self.dres.pos[g.layer].hits(col), self.get_batch, tok)
            top += _token_scores(self.dres.neg[g.layer].hits(col), self.get_batch, tok)
            dossier.diff = DiffSummary(
                mean_projection=mean_p, variance_share=share, n_tokens=n, top_tokens=top
            )
        if self.cfg.logit_lens and self.source.is_causal_lm:
            with self.source.use("base") as lm:
                dossier.logit_lens = logit_lens(lm, direction, self.cfg.lens_tokens)
        if self.cfg.steering.enabled and self.source.is_causal_lm:
            if (
                self.steerer is None
            ):  # unsteered generations are made once, and only when a dossier needs them
                self.steerer = Steerer(self.cfg, self.source, self.coherence)
            dossier.steering = self.steerer.run(g.layer, direction, cres.residual_norm(g.layer))
        return dossier


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
    started = time.time()
    run = RunDir(run_dir)
    stage = run.stage("evidence")
    if stage.done:
        return stage.path
    stage.ensure()
    diff_dir, sae_dir = run.layout.stage("diff"), run.layout.stage("sae")

    paths = _candidate_paths(cfg, run)
    cands, dirs = load_candidate_set(paths)
    if not cands:
        raise DataError(f"the candidate files {[str(p) for p in paths]} list no candidates")

    if source is None:
        base_cfg, ft_cfg = resolve_models(cfg.model, cfg.finetuned, model, finetuned, need_ft=False)
        source = ActivationSource.load(base_cfg, ft_cfg)
    if source.remote and source.is_causal_lm and (cfg.logit_lens or cfg.steering.enabled):
        raise ConfigError(
            "with remote: true the evidence stage runs its corpus pass on NDIF, but the logit lens and the "
            "steered generations need the weights here; set evidence.logit_lens: false and "
            "evidence.steering.enabled: false (or load the model locally)"
        )
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

    n_tokens = sum(len(e.input_ids) for e in corpus)
    corpus_info: dict[str, Any] = {
        "corpus": corpus_name,
        "corpus_docs": len(corpus),
        "corpus_tokens": n_tokens,
    }
    assembler = _Assembler(
        cfg, source, corpus, corpus_docs, corpus_info, saes, cres, dres, get_batch, coherence
    )
    out_dir = stage.path / DOSSIER_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    todo = [(g, col, c) for g in groups for col, c in enumerate(g.candidates)]
    for g, col, c in tqdm(todo, desc="evidence: dossiers", unit="candidate"):
        path = out_dir / dossier_filename(c.id)
        digest = direction_digest(g.directions[:, col])
        if path.is_file() and dossier_digest(path) == digest:
            continue
        write_dossier(path, assembler.dossier(g, col, c, digest))
        written += 1
    stage.mark_done(
        {
            "n_dossiers": len(todo),
            "written_now": written,
            **corpus_info,
            "layers": [g.layer for g in groups],
            "config": scrub_obj(cfg.model_dump(mode="json")),
        },
        started=started,
    )
    return stage.path
