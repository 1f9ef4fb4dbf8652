"""Candidates and dossiers: what interp produces and what the judge agent reads.

Files in a run's `diff/` (and `sae/`) stage folder:
    candidates.jsonl          one `Candidate` per line
    directions.safetensors    one float32 [d_model] unit vector per candidate, key = candidate id
Files in `evidence/`:
    dossiers/<safe id>.json   one `Dossier` per candidate (`dossier_filename(id)`)

Every evidence item in a dossier has an `id` ("ex:max:3", "ex:min:0", "diff", "lens", "steer:ft:+:1", ...)
so that a verdict can cite the items it relied on and the citation can be checked.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from caft.errors import DataError
from caft.rundir import CANDIDATES_FILE as CANDIDATES_FILE
from caft.rundir import DIRECTIONS_FILE as DIRECTIONS_FILE
from caft.rundir import DOSSIER_DIR as DOSSIER_DIR
from caft.rundir import (
    atomic_write_bytes,
    atomic_write_text,
    iter_jsonl,
)

if TYPE_CHECKING:
    import torch

CandidateKind = Literal["pc", "sae", "vector"]


class Candidate(BaseModel):
    """A direction at one layer that might carry a concept the fine-tune picked up."""

    model_config = ConfigDict(extra="forbid")

    id: str
    """Unique id: `pc:L{layer}:{index}`, `sae:L{layer}:{latent}`, `vec:L{layer}:mean`."""
    kind: CandidateKind
    layer: int
    index: int
    """PC rank, SAE latent index, or 0 for a single vector."""
    source: str = ""
    """Where it came from: `pca`, `sae:<name>`, `probe`, `random`, ..."""
    scores: dict[str, float] = Field(default_factory=dict)
    """Every ranking score: `explained_variance_ratio`, `eigenvalue`, `mean_diff`, `sae_diff`, `attribution`, ..."""
    ranks: dict[str, int] = Field(default_factory=dict)
    """Rank (0 = top) in each ranking that placed it."""
    sae: str | None = None
    """For SAE latents: the name of the SAE (in the sae stage's `saes.json`) whose encoder gives the
    latent's activation."""


def candidate_id(kind: CandidateKind, layer: int, index: int | str) -> str:
    prefix = {"pc": "pc", "sae": "sae", "vector": "vec"}[kind]
    return f"{prefix}:L{layer}:{index}"


def dossier_filename(cid: str) -> str:
    """A file name for a candidate id (`pc:L3:0` -> `pc_L3_0.json`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", cid) + ".json"


class Window(BaseModel):
    """A token window around a strongly activating position of a reference corpus."""

    id: str
    """`ex:max:<rank>` or `ex:min:<rank>`."""
    sign: Literal["max", "min"]
    doc: str
    """Id of the corpus document."""
    tokens: list[str]
    values: list[float]
    """Projection (or SAE activation) at each token."""
    scaled: list[int]
    """Values scaled to 0-10 relative to the candidate's largest |value| over all windows."""
    peak: int
    """Index into `tokens` of the peak position."""
    value: float
    """The value at the peak."""
    position: int | None = None
    """Position of the peak token in the document."""
    pieces: list[str] | None = None
    """The text each token adds to the decoded window (the tokenizer's own decode; a leading space where a
    word starts); None in dossiers written before it was recorded (`caft.interp.windows` then guesses)."""


class TokenScore(BaseModel):
    token: str
    value: float
    context: str = ""


class DiffSummary(BaseModel):
    """How the fine-tune moves activations along the candidate (over the training data)."""

    id: str = "diff"
    mean_projection: float
    """Mean of (ft - base) . direction over the tokens analysed."""
    variance_share: float
    """Share of the total variance of (ft - base) that lies along the direction."""
    n_tokens: int
    top_tokens: list[TokenScore] = Field(default_factory=list)
    """Tokens where the difference projects most strongly (positive side first)."""


class LogitLens(BaseModel):
    """The direction read through the final norm and unembedding."""

    id: str = "lens"
    promoted: list[TokenScore]
    suppressed: list[TokenScore]


class Generation(BaseModel):
    id: str
    """`steer:<base|ft>:<+|-|0>:<prompt index>`."""
    model: Literal["base", "ft"]
    prompt: str
    alpha: float
    """Steering coefficient in units of the typical residual norm at the layer (0 = unsteered)."""
    text: str
    perplexity: float | None = None
    """Perplexity of the generation under the base model (the offline coherence proxy)."""


class Steering(BaseModel):
    id: str = "steer"
    alpha: float
    """The largest |alpha| that kept generations coherent (found by bounded search)."""
    residual_norm: float
    """Typical residual norm at the layer; the added vector is alpha * residual_norm * unit direction."""
    generations: list[Generation]
    search: list[dict[str, Any]] = Field(default_factory=list)
    """The strengths tried by the search and whether each kept generations coherent."""
    baseline_perplexity: float | None = None
    """Mean perplexity of the unsteered base generations (the reference of the coherence proxy)."""


class ConceptResponse(BaseModel):
    """How a direction responds to one concept of the task: the projections of minimal-pair activation shifts
    (second value minus first, mean-pooled base activations; `caft.interp.contrast`)."""

    id: str
    """`contrast:<concept>`."""
    concept: str
    values: list[str]
    """The concept's two values, in the order of the shift (first -> second)."""
    mean: float
    """Mean projection of the shifts on the direction."""
    std: float
    """Their standard deviation."""
    n: int
    """Minimal pairs."""
    share: float
    """`mean` over the length of the concept's mean shift: 1 when the direction is that shift, about
    1/sqrt(d_model) for a random one."""
    effect: float
    """`mean / std`."""


class Dossier(BaseModel):
    """Everything the judge sees about one candidate."""

    model_config = ConfigDict(extra="forbid")

    candidate: Candidate
    provenance: dict[str, Any] = Field(default_factory=dict)
    """Model ids, layer, kind, rankings, corpus name and size."""
    max_examples: list[Window] = Field(default_factory=list)
    min_examples: list[Window] = Field(default_factory=list)
    diff: DiffSummary | None = None
    logit_lens: LogitLens | None = None
    steering: Steering | None = None
    contrast: list[ConceptResponse] = Field(default_factory=list)
    """The direction's response to each concept of the task's `concept_words` (empty when the task names none)."""

    def evidence_ids(self) -> set[str]:
        """Ids a verdict may cite."""
        ids = {w.id for w in self.max_examples} | {w.id for w in self.min_examples}
        if self.diff is not None:
            ids.add(self.diff.id)
        if self.logit_lens is not None:
            ids.add(self.logit_lens.id)
        if self.steering is not None:
            ids.add(self.steering.id)
            ids |= {g.id for g in self.steering.generations}
        ids |= {r.id for r in self.contrast}
        return ids


# ---- reading and writing candidate files ---------------------------------------------------------------


def _candidates_path(path: str | Path) -> Path:
    p = Path(path)
    return p / CANDIDATES_FILE if p.is_dir() else p


def load_candidates(path: str | Path) -> list[Candidate]:
    """Candidates from a `candidates.jsonl` file or a stage folder holding one."""
    p = _candidates_path(path)
    out: list[Candidate] = []
    for i, row in enumerate(iter_jsonl(p), 1):
        try:
            out.append(Candidate.model_validate(row))
        except ValueError as e:
            raise DataError(f"{p}: candidate {i} is malformed: {e}") from None
    return out


def load_directions(paths: str | Path | Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """Candidate id -> float32 [d_model] unit direction, from one or more `directions.safetensors` files (or
    stage folders holding one). Every tensor must be 1-D and finite; an id found in two files is an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for item in [paths] if isinstance(paths, str | Path) else paths:
        p = Path(item)
        if p.is_dir():
            p = p / DIRECTIONS_FILE
        if not p.is_file():
            raise DataError(f"directions file not found: {p} (run `caft diff` or `caft sae rank` first)")
        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise DataError(f"{p} cannot be read as safetensors: {e}") from None
        for k, v in tensors.items():
            if v.ndim != 1:
                raise DataError(f"{p}: direction {k!r} has shape {tuple(v.shape)}, expected [d_model]")
            if not bool(v.isfinite().all()):
                raise DataError(
                    f"{p}: direction {k!r} holds NaN or inf values; re-run the stage that wrote it"
                )
            if k in out:
                raise DataError(f"direction {k!r} appears in two directions files (second time in {p})")
            out[k] = v.float()
    return out


def load_candidate_set(paths: Sequence[str | Path]) -> tuple[list[Candidate], dict[str, torch.Tensor]]:
    """Candidates and their directions from several candidate files (or stage folders); ids must be unique and
    every candidate must have a direction."""
    cands: list[Candidate] = []
    dirs: dict[str, torch.Tensor] = {}
    for item in paths:
        path = Path(item)
        folder = path if path.is_dir() else path.parent
        these = load_candidates(path)
        d = load_directions(folder)
        for c in these:
            if c.id in dirs:
                raise DataError(f"candidate id {c.id!r} appears twice (second time in {path})")
            if c.id not in d:
                raise DataError(
                    f"{folder}: no direction for candidate {c.id!r}; re-run the stage that wrote it"
                )
            dirs[c.id] = d[c.id]
            cands.append(c)
    return cands, dirs


def save_candidates(
    folder: str | Path, candidates: Sequence[Candidate], directions: Mapping[str, torch.Tensor]
) -> None:
    """Write `candidates.jsonl` and `directions.safetensors` atomically (directions first, so a candidates
    file never names a direction that is not on disk)."""
    import torch
    from safetensors.torch import save

    missing = [c.id for c in candidates if c.id not in directions]
    if missing:
        raise ValueError(f"no direction for candidates {missing[:5]}")
    tensors = {
        c.id: directions[c.id].detach().to(device="cpu", dtype=torch.float32).contiguous() for c in candidates
    }
    d = Path(folder)
    atomic_write_bytes(d / DIRECTIONS_FILE, save(tensors))
    text = "".join(json.dumps(c.model_dump(mode="json"), ensure_ascii=False) + "\n" for c in candidates)
    atomic_write_text(d / CANDIDATES_FILE, text)


def load_dossiers(folder: str | Path) -> list[Dossier]:
    """Every dossier of an evidence stage folder (or its `dossiers/` subfolder), validated, sorted by layer then
    candidate id. An empty folder, an invalid file or two dossiers for one candidate are errors."""
    d = Path(folder)
    where = d / DOSSIER_DIR if (d / DOSSIER_DIR).is_dir() else d
    files = sorted(where.glob("*.json"))
    if not files:
        raise DataError(
            f"no dossiers in {where}: expected <evidence>/{DOSSIER_DIR}/*.json from the evidence stage "
            "(run `caft evidence` first, or point at its output folder)"
        )
    out: list[Dossier] = []
    for f in files:
        try:
            out.append(Dossier.model_validate_json(f.read_text(encoding="utf-8")))
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise DataError(f"{f} is not a valid dossier ({loc}: {first['msg']})") from None
    ids = Counter(x.candidate.id for x in out)
    dup = [k for k, n in ids.items() if n > 1]
    if dup:
        raise DataError(f"{where}: several dossiers for candidate(s) {dup[:5]}; remove the stale files")
    return sorted(out, key=lambda x: (x.candidate.layer, x.candidate.id))


def dossier_digest(path: str | Path) -> str | None:
    """The direction digest recorded in a dossier file's provenance (None when the file is unreadable or has
    none): the evidence stage keeps a dossier on resume only when its direction is unchanged."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    prov = data.get("provenance") if isinstance(data, dict) else None
    digest = prov.get("direction_digest") if isinstance(prov, dict) else None
    return str(digest) if digest is not None else None


def write_dossier(path: str | Path, dossier: Dossier) -> Path:
    """Write one dossier atomically (the file is `<dossiers>/dossier_filename(id)`)."""
    atomic_write_text(path, dossier.model_dump_json(indent=1) + "\n")
    return Path(path)


def write_random_candidates(out: str | Path, d_model: int, layers: list[int], n: int, seed: int) -> Path:
    """`candidates.jsonl` + `directions.safetensors` of `n` random unit directions per layer (ids
    `vec:L<layer>:null<i>`, source `random`): the null set an offline judge calibrates against. Kept if the
    folder already holds them."""
    import torch

    folder = Path(out)
    if (folder / CANDIDATES_FILE).is_file():
        return folder
    gen = torch.Generator().manual_seed(10_000 + seed)
    cands, dirs = [], {}
    for layer in layers:
        for i in range(n):
            cid = f"vec:L{layer}:null{i}"
            cands.append(Candidate(id=cid, kind="vector", layer=layer, index=i, source="random"))
            v = torch.randn(d_model, generator=gen)
            dirs[cid] = v / v.norm()
    save_candidates(folder, cands, dirs)
    return folder
