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
from caft.interp.contrast import CONTRAST_DIR, ConceptShifts, contrast_candidates, evidence_shifts, responses
from caft.interp.corpus import check_corpus, reference_corpus
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
from caft.interp.inputs import INPUTS_FILE, Example, TokenBatch, load_examples, make_batches
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
    save_candidates,
    write_dossier,
)
from caft.interp.source import ActivationSource, model_label, resolve_models
from caft.interp.steering import Steerer, llm_coherence
from caft.interp.topk import Hit
from caft.interp.windows import Detokenizer, dedupe_windows
from caft.rundir import CANDIDATES_FILE, DOSSIER_DIR, RunDir

log = logging.getLogger(__name__)


# ---- windows and summaries -------------------------------------------------------------------------------


def make_windows(
    hits: list[Hit],
    sign: str,
    corpus: list[Example],
    corpus_docs: list[str],
    tokenizer: Any,
    scale: float,
    detok: Detokenizer | None = None,
) -> list[Window]:
    """One `Window` per hit, with each token's string and its decoded piece (`caft.interp.windows`)."""
    out: list[Window] = []
    s = 1.0 if sign == "max" else -1.0
    dt = detok or Detokenizer(tokenizer)
    for rank, hit in enumerate(hits):
        ids = corpus[hit.doc].input_ids
        toks: list[str] = []
        vals: list[float] = []
        pieces: list[str] = []
        peak = 0
        for j, v in enumerate(hit.values):
            p = hit.start + j
            if not 0 <= p < len(ids) or math.isnan(v):
                continue
            if p == hit.pos:
                peak = len(toks)
            toks.append(token_text(tokenizer, ids[p]))
            pieces.append(dt.piece(int(ids[p - 1]) if p > 0 else None, int(ids[p])))
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
                pieces=pieces,
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
    cfg: EvidenceConfig, source: ActivationSource, diff_dir: Path | None, stage_dir: Path | None = None
) -> tuple[list[Example], dict[str, Any]]:
    """The reference corpus (examples keep their original doc ids) and its provenance
    (`caft.interp.corpus.reference_corpus`)."""
    return reference_corpus(cfg, source, diff_dir, stage_dir)


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
        self.detok = Detokenizer(source.tokenizer)
        self.shifts: list[ConceptShifts] = []
        """Minimal-pair shifts per concept (the dossiers' contrast section)."""

    def windows(self, hits: list[Hit], sign: str, scale: float) -> list[Window]:
        """The candidate's windows of one sign: near-duplicates dropped (`cfg.dedupe`), `cfg.top_k` kept."""
        ws = make_windows(hits, sign, self.corpus, self.corpus_docs, self.source.tokenizer, scale, self.detok)
        if not self.cfg.dedupe:
            return ws[: self.cfg.top_k]
        return dedupe_windows(ws, self.cfg.top_k, span=self.cfg.window // 2)

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
            max_examples=self.windows(maxh, "max", scale),
            min_examples=self.windows(minh, "min", scale),
            contrast=responses(self.shifts, g.layer, direction),
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
    diff_dir: str | Path | None = None,
) -> Path:
    """Write `RUN/evidence/dossiers/<id>.json` for every candidate; returns the stage folder.

    Candidates come from `cfg.candidates` or the run's `diff/` and `sae/` stages. Resumable: finished
    passes and dossiers are kept. `coherence` replaces the perplexity proxy of the steering search.
    `diff_dir`: the diff stage whose token inputs are the corpus fallback and the difference summary's
    data (default `RUN/diff`; the triage's random controls, built in a folder of their own, pass the run's).
    """
    started = time.time()
    run = RunDir(run_dir)
    stage = run.stage("evidence")
    if stage.done:
        return stage.path
    stage.ensure()
    check_corpus(cfg)  # a bad corpus file fails before the models load
    diff_dir = Path(diff_dir) if diff_dir is not None else run.layout.stage("diff")
    sae_dir = run.layout.stage("sae")

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
    shifts = evidence_shifts(
        cfg.contrast,
        source,
        cfg.corpus,
        sorted({sites.resolve_layer(c.layer) for c in cands}),
        max_docs=cfg.max_corpus_docs,
        batch_size=cfg.batch_size,
    )
    if shifts and cfg.contrast.basis > 0:  # the contrast basis: more candidates, judged like the rest
        ccands, cdirs = contrast_candidates(shifts, cfg.contrast.basis)
        save_candidates(stage.path / CONTRAST_DIR, ccands, cdirs)
        cands, dirs = [*cands, *ccands], {**dirs, **cdirs}
    groups = group_by_layer(cands, dirs, sites.d_model, sites.n_layers)
    saes = _load_saes(cands, sae_dir, paths, source)

    corpus, corpus_prov = prepare_corpus(cfg, source, diff_dir, stage.path)
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
        **corpus_prov,
        "corpus_docs": len(corpus),
        "corpus_tokens": n_tokens,
    }
    own_check = None
    if coherence is None and cfg.steering.enabled and source.is_causal_lm:
        coherence = own_check = llm_coherence(cfg, run.path)
    assembler = _Assembler(
        cfg, source, corpus, corpus_docs, corpus_info, saes, cres, dres, get_batch, coherence
    )
    assembler.shifts = shifts
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
    checked = assembler.steerer.coherent if assembler.steerer is not None else None
    describe = getattr(checked, "describe", None)
    coherence_info = {"coherence": describe()} if callable(describe) else {}
    if own_check is not None:
        own_check.close()
    stage.mark_done(
        {
            "n_dossiers": len(todo),
            "written_now": written,
            **corpus_info,
            "layers": [g.layer for g in groups],
            **coherence_info,
            "contrast": {s.concept: s.n for s in shifts},
            "config": scrub_obj(cfg.model_dump(mode="json")),
        },
        started=started,
    )
    return stage.path
