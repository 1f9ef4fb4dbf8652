"""Selection policy: verdicts -> the candidates to ablate -> the subspace artifact.

Works on `VerdictRecord`s from any source (single-shot LLM, agent, offline embedding judge, a person's edits).
Nothing selected is an ordinary outcome: the result is an empty `Selection` and an empty (valid) subspace,
with a note that says why.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from caft.agent.config import SelectionPolicy
from caft.agent.schema import SELECTION_FILE, SelectedColumn, Selection, VerdictRecord
from caft.errors import DataError, SubspaceError
from caft.interp.schema import Candidate
from caft.rundir import DIRECTIONS_FILE, atomic_write_json, iter_jsonl
from caft.subspace import Column, Subspace

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SUBSPACE_DIR = "subspace"


# ---- inputs ------------------------------------------------------------------------------------------------
def find_directions(evidence_dir: str | Path) -> Path | None:
    """The candidates' directions: `<evidence>/directions.safetensors` or a sibling stage's (`diff/`, `sae/`)."""
    d = Path(evidence_dir)
    for p in (d / DIRECTIONS_FILE, d.parent / "diff" / DIRECTIONS_FILE, d.parent / "sae" / DIRECTIONS_FILE):
        if p.is_file():
            return p.resolve()
    return None


def load_verdicts(path: str | Path) -> list[VerdictRecord]:
    """Records of a verdicts.jsonl; a later record for the same (candidate, judge, method, sample) replaces an
    earlier one (a rerun that retried a provider error)."""
    latest: dict[tuple[str, str, str, int], VerdictRecord] = {}
    for i, row in enumerate(iter_jsonl(path), 1):
        try:
            rec = VerdictRecord.model_validate(row)
        except ValidationError as e:
            raise DataError(f"{path}: record {i} is not a verdict record: {e.errors()[0]['msg']}") from None
        latest[(rec.candidate, rec.judge, rec.method, rec.sample)] = rec
    return list(latest.values())


# ---- policy ------------------------------------------------------------------------------------------------
def _rank(c: Candidate, ranking: str | None) -> float:
    if ranking is not None:
        return float(c.ranks[ranking]) if ranking in c.ranks else float("inf")
    return float(min(c.ranks.values())) if c.ranks else float(c.index)


def _aggregate(
    recs: list[VerdictRecord], policy: SelectionPolicy
) -> tuple[bool, float, VerdictRecord | None, dict[str, Any]]:
    """(selected?, score, representative record, vote details) for one candidate's scored records."""
    scored = [r for r in recs if r.verdict is not None or r.relevance is not None]
    if not scored:
        return False, 0.0, None, {}
    if policy.score == "relevance":
        rel = [r for r in scored if r.relevance is not None]
        if not rel:
            return False, 0.0, None, {"relevance": None}
        mean_rel = sum(r.relevance for r in rel if r.relevance is not None) / len(rel)
        best = max(rel, key=lambda r: r.relevance or 0.0)
        return mean_rel >= policy.relevance_threshold, mean_rel / 100.0, best, {"relevance": mean_rel}
    judged = [r for r in scored if r.verdict is not None]
    if not judged:
        return False, 0.0, None, {}
    undesired = [r for r in judged if r.verdict is not None and r.verdict.relation == "undesired"]
    votes = [r for r in undesired if r.verdict is not None and r.verdict.confidence >= policy.threshold]
    rep = max(undesired, key=lambda r: r.verdict.confidence if r.verdict else 0.0) if undesired else judged[0]
    info: dict[str, Any] = {"n": len(judged), "undesired_votes": len(votes)}
    if policy.ensemble == "majority":
        conf = sum(r.verdict.confidence for r in votes if r.verdict) / len(votes) if votes else 0.0
        return 2 * len(votes) > len(judged), conf, rep, info
    mean = sum(r.verdict.confidence for r in undesired if r.verdict) / len(judged)
    info["mean_undesired_confidence"] = mean
    return mean >= policy.threshold, mean, rep, info


def _column(c: Candidate, rec: VerdictRecord | None, score: float | None) -> SelectedColumn:
    v = rec.verdict if rec is not None else None
    return SelectedColumn(
        candidate=c.id,
        layer=c.layer,
        label=v.label if v else None,
        relation=v.relation if v else None,
        confidence=score,
        verdict_ref=(rec.exchange or f"{rec.method}:{rec.judge}") if rec is not None else None,
    )


def _apply_limits(
    ranked: list[tuple[Candidate, SelectedColumn]], policy: SelectionPolicy
) -> tuple[list[SelectedColumn], list[str]]:
    per_layer: Counter[int] = Counter()
    kept: list[SelectedColumn] = []
    dropped: list[str] = []
    for c, col in ranked:
        if (policy.max_total is not None and len(kept) >= policy.max_total) or (
            policy.max_per_layer is not None and per_layer[c.layer] >= policy.max_per_layer
        ):
            dropped.append(c.id)
        else:
            kept.append(col)
            per_layer[c.layer] += 1
    return kept, dropped


def select(
    records: Iterable[VerdictRecord],
    candidates: Sequence[Candidate],
    policy: SelectionPolicy | None = None,
    chosen: set[str] | None = None,
) -> Selection:
    """Apply the policy. `chosen`: the agent's final `finish` list (None: the judge made none); it limits the
    selection unless `policy.require_chosen` is False."""
    pol = policy or SelectionPolicy()
    by_id = {c.id: c for c in candidates}
    recs: dict[str, list[VerdictRecord]] = defaultdict(list)
    unknown: set[str] = set()
    for r in records:
        if pol.methods is not None and r.method not in pol.methods:
            continue
        if pol.judges is not None and r.judge not in pol.judges:
            continue
        if r.candidate not in by_id:
            unknown.add(r.candidate)
            continue
        recs[r.candidate].append(r)
    if unknown:
        log.warning(
            "ignoring verdicts for %d candidates without a dossier: %s", len(unknown), sorted(unknown)[:5]
        )
    scored_ids = {cid for cid, rs in recs.items() if any(r.verdict or r.relevance is not None for r in rs)}
    unscored_ids = sorted(set(recs) - scored_ids)
    policy_dump = pol.model_dump(mode="json")
    if pol.baseline != "none":
        return _baseline(candidates, recs, pol, policy_dump, len(scored_ids))

    use_picks = pol.require_chosen is True or (pol.require_chosen is None and chosen is not None)
    unpicked: list[str] = []
    ranked: list[tuple[float, float, str, Candidate, SelectedColumn]] = []
    for cid, rs in recs.items():
        ok, score, rep, _ = _aggregate(rs, pol)
        if not ok:
            continue
        if use_picks and (chosen is None or cid not in chosen):
            unpicked.append(cid)
            continue
        c = by_id[cid]
        ranked.append((-score, _rank(c, pol.ranking), cid, c, _column(c, rep, round(score, 4))))
    ranked.sort(key=lambda t: t[:3])
    kept, dropped = _apply_limits([(t[3], t[4]) for t in ranked], pol)
    notes: list[str] = []
    if not kept:
        if not scored_ids:
            notes.append("nothing selected: no candidate has a scored verdict")
        else:
            rule = (
                f"relevance >= {pol.relevance_threshold:g}"
                if pol.score == "relevance"
                else f"relation 'undesired' with confidence >= {pol.threshold:g} ({pol.ensemble})"
            )
            notes.append(f"nothing selected: none of {len(scored_ids)} judged candidates has {rule}")
    if unpicked:
        why = "not in the agent's finish list" if chosen is not None else "no finish list (require_chosen)"
        notes.append(f"{len(unpicked)} qualifying candidates left out, {why}: {sorted(unpicked)}")
    if dropped:
        notes.append(f"{len(dropped)} qualifying candidates left out by the layer/total limits: {dropped}")
    if unscored_ids:
        notes.append(f"{len(unscored_ids)} candidates have no scored verdict: {unscored_ids[:10]}")
    return Selection(
        policy=policy_dump,
        selected=kept,
        considered=len(scored_ids),
        notes="; ".join(notes),
        dropped=dropped,
        unscored=unscored_ids,
    )


def _baseline(
    candidates: Sequence[Candidate],
    recs: dict[str, list[VerdictRecord]],
    pol: SelectionPolicy,
    policy_dump: dict[str, Any],
    considered: int,
) -> Selection:
    groups: dict[int | None, list[Candidate]] = defaultdict(list)
    for c in candidates:
        if pol.baseline == "top_k" and pol.ranking is not None and pol.ranking not in c.ranks:
            continue
        groups[c.layer if pol.per_layer else None].append(c)
    rng = random.Random(pol.seed)
    picked: list[Candidate] = []
    for key in sorted(groups, key=lambda k: -1 if k is None else k):
        group = sorted(groups[key], key=lambda c: (_rank(c, pol.ranking), c.id))
        if pol.baseline == "top_k":
            picked += group[: pol.k]
        else:
            picked += rng.sample(group, min(pol.k, len(group)))
    cols = []
    for c in picked:
        rs = [r for r in recs.get(c.id, []) if r.verdict is not None]
        cols.append(
            _column(c, rs[0] if rs else None, rs[0].verdict.confidence if rs and rs[0].verdict else None)
        )
    note = f"baseline {pol.baseline} (k={pol.k}{' per layer' if pol.per_layer else ''}); verdicts not used"
    if not cols:
        note = f"nothing selected: baseline {pol.baseline} found no candidates"
    return Selection(policy=policy_dump, selected=cols, considered=considered, notes=note)


# ---- outputs -----------------------------------------------------------------------------------------------
def build_subspace(
    selection: Selection,
    directions: dict[str, torch.Tensor],
    d_model: int | None = None,
    model: str | None = None,
    n_layers: int | None = None,
) -> Subspace:
    """Orthonormalize the selected directions per layer, with one provenance record per column."""
    import torch

    dims = {int(v.shape[0]) for v in directions.values()}
    if d_model is None:
        if len(dims) > 1:
            raise SubspaceError(f"the directions have different sizes {sorted(dims)}; pass d_model")
        if not dims:
            raise SubspaceError(
                "no directions given and no d_model; pass the directions file of the candidates"
            )
        d_model = dims.pop()
    vectors: dict[int, list[torch.Tensor]] = defaultdict(list)
    prov: dict[int, list[Column]] = defaultdict(list)
    for col in selection.selected:
        vec = directions.get(col.candidate)
        if vec is None:
            raise SubspaceError(
                f"selected candidate {col.candidate!r} has no direction in the directions file; "
                "pass the directions.safetensors written with these candidates (--directions)"
            )
        if vec.shape[0] != d_model:
            raise SubspaceError(f"direction {col.candidate!r} has size {vec.shape[0]}, expected {d_model}")
        vectors[col.layer].append(vec.float())
        extra: dict[str, Any] = {"layer": col.layer}
        if col.confidence is not None:
            extra["confidence"] = col.confidence
        if col.verdict_ref:
            extra["verdict_ref"] = col.verdict_ref
        prov[col.layer].append(
            Column(candidate=col.candidate, label=col.label, verdict=col.relation, extra=extra)
        )
    stacked = {layer: torch.stack(vs) for layer, vs in vectors.items()}
    return Subspace.from_vectors(
        stacked, d_model=d_model, provenance=dict(prov), model=model, n_layers=n_layers
    )


def write_selection(
    out_dir: str | Path,
    selection: Selection,
    directions: dict[str, torch.Tensor],
    d_model: int | None = None,
    model: str | None = None,
    n_layers: int | None = None,
    subspace_dir: str | Path | None = None,
) -> Subspace:
    """Write `selection.json` and the subspace folder (`<out>/subspace` unless given); returns the subspace."""
    out = Path(out_dir)
    sub = build_subspace(selection, directions, d_model=d_model, model=model, n_layers=n_layers)
    sub.save(Path(subspace_dir) if subspace_dir is not None else out / SUBSPACE_DIR)
    atomic_write_json(out / SELECTION_FILE, selection.model_dump(mode="json"))
    if sub.is_empty:
        log.info("empty selection: %s", selection.notes or "no candidate chosen")
    return sub


def read_selection(path: str | Path) -> Selection:
    p = Path(path)
    if p.is_dir():
        p = p / SELECTION_FILE
    if not p.is_file():
        raise DataError(f"{p} not found: pass a selection.json (written by `caft triage` or the review page)")
    try:
        return Selection.model_validate_json(p.read_text(encoding="utf-8"))
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise DataError(f"{p} is not a valid selection ({loc}: {first['msg']})") from None


def prefilter_rank(records: Iterable[VerdictRecord], method: str) -> list[str]:
    """Candidate ids ranked by cheap verdicts of `method`: relevance when present, else a calibrated `z`
    score, else the confidence of an `undesired` verdict (0 for other relations); ties keep file order."""
    best: dict[str, float] = {}
    for r in records:
        if r.method != method:
            continue
        if r.relevance is not None:
            score = r.relevance / 100.0
        elif "z" in r.scores:  # the offline judge's calibrated score
            score = r.scores["z"]
        elif r.verdict is not None and r.verdict.relation == "undesired":
            score = r.verdict.confidence
        else:
            score = 0.0
        best[r.candidate] = max(score, best.get(r.candidate, float("-inf")))
    return sorted(best, key=lambda c: -best[c])
