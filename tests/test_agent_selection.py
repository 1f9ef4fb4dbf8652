"""Selection policy: thresholds, limits, ensembles, sources, baselines, and the empty outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from caft.agent.config import SelectionPolicy
from caft.agent.fixtures import make_dossier, record, write_evidence
from caft.agent.schema import JudgeVerdict, SelectedColumn, Selection, VerdictRecord
from caft.agent.selection import (
    build_subspace,
    load_verdicts,
    select,
    write_selection,
)
from caft.agent.triage import apply_selection
from caft.errors import DataError, SubspaceError
from caft.interp.schema import Candidate, load_directions, load_dossiers
from caft.rundir import JsonlWriter
from caft.subspace import Subspace


def cand(cid: str, layer: int, rank: int = 0) -> Candidate:
    return Candidate(id=cid, kind="pc", layer=layer, index=rank, ranks={"pca": rank})


CANDS = [cand(f"pc:L{layer}:{i}", layer, i) for layer in (1, 2) for i in range(4)]


def ids(sel: Selection) -> list[str]:
    return [s.candidate for s in sel.selected]


def test_threshold_is_inclusive_and_only_undesired_counts() -> None:
    recs = [
        record("pc:L1:0", "evil", 0.7),
        record("pc:L1:1", "evil", 0.69),
        record("pc:L1:2", "code", 0.99),
        record("pc:L1:3", "gender", 0.95),  # unclear
    ]
    sel = select(recs, CANDS, SelectionPolicy(threshold=0.7))
    assert ids(sel) == ["pc:L1:0"] and sel.considered == 4
    col = sel.selected[0]
    assert (col.layer, col.label, col.relation, col.confidence) == (1, "evil concept", "undesired", 0.7)


def test_limits_keep_the_most_confident_and_report_dropped() -> None:
    confs = {"pc:L1:0": 0.8, "pc:L1:1": 0.95, "pc:L1:2": 0.9, "pc:L2:0": 0.85, "pc:L2:1": 0.75}
    recs = [record(c, "evil", v) for c, v in confs.items()]
    sel = select(recs, CANDS, SelectionPolicy(max_per_layer=2, max_total=3))
    assert ids(sel) == ["pc:L1:1", "pc:L1:2", "pc:L2:0"]
    assert sel.dropped == ["pc:L1:0", "pc:L2:1"] and "limits" in sel.notes
    assert ids(select(recs, CANDS, SelectionPolicy(max_per_layer=None, max_total=None))) == sorted(
        confs, key=lambda c: -confs[c]
    )


def test_ensemble_majority_and_mean() -> None:
    # pc:L1:0: 2 of 3 samples undesired; pc:L1:1: 1 of 3; pc:L2:0: 2 of 4 (a tie is not a majority)
    recs = [
        record("pc:L1:0", "evil", 0.9, sample=0),
        record("pc:L1:0", "evil", 0.8, sample=1),
        record("pc:L1:0", "weather", 0.9, sample=2),
        record("pc:L1:1", "evil", 1.0, sample=0),
        record("pc:L1:1", "code", 0.9, sample=1),
        record("pc:L1:1", "code", 0.9, sample=2),
        record("pc:L2:0", "evil", 0.9, judge="a"),
        record("pc:L2:0", "evil", 0.9, judge="b"),
        record("pc:L2:0", "code", 0.9, judge="c"),
        record("pc:L2:0", "code", 0.9, judge="d"),
    ]
    maj = select(recs, CANDS, SelectionPolicy(ensemble="majority", threshold=0.7))
    assert ids(maj) == ["pc:L1:0"] and maj.selected[0].confidence == pytest.approx(0.85)
    mean = select(recs, CANDS, SelectionPolicy(ensemble="mean", threshold=0.55))
    # mean undesired confidence: L1:0 (0.9+0.8)/3=0.567, L1:1 1/3, L2:0 1.8/4=0.45
    assert ids(mean) == ["pc:L1:0"] and mean.selected[0].confidence == pytest.approx(0.5667, abs=1e-3)
    only_ab = select(recs, CANDS, SelectionPolicy(judges=["a", "b"]))
    assert "pc:L2:0" in ids(only_ab)


def test_any_verdict_source_and_relevance_scores() -> None:
    offline = [
        VerdictRecord(
            candidate="pc:L1:0",
            judge="offline-embedding",
            method="offline-embedding",
            verdict=JudgeVerdict(
                label="harm",
                description="d",
                relation="undesired",
                confidence=0.8,
                evidence=["ex:max:0"],
                rationale="similar to undesired concepts",
            ),
            relevance=88.0,
            scores={"z": 3.1},
        ),
        VerdictRecord(
            candidate="pc:L1:1",
            judge="offline-embedding",
            method="offline-embedding",
            relevance=40.0,
            scores={"z": 0.2},
        ),
        record("pc:L1:2", "evil", 0.95),
    ]
    assert ids(select(offline, CANDS, SelectionPolicy(methods=["offline-embedding"]))) == ["pc:L1:0"]
    assert ids(select(offline, CANDS, SelectionPolicy(methods=["single"]))) == ["pc:L1:2"]
    rel = select(offline, CANDS, SelectionPolicy(score="relevance", relevance_threshold=70))
    assert ids(rel) == ["pc:L1:0"] and rel.selected[0].confidence == pytest.approx(0.88)


def test_require_chosen_and_unknown_candidates() -> None:
    recs = [record("pc:L1:0", "evil"), record("pc:L1:1", "evil"), record("pc:L9:9", "evil")]
    assert ids(select(recs, CANDS, SelectionPolicy(require_chosen=True), chosen={"pc:L1:1"})) == ["pc:L1:1"]
    assert ids(select(recs, CANDS, SelectionPolicy(require_chosen=True), chosen=None)) == []
    assert ids(select(recs, CANDS)) == ["pc:L1:0", "pc:L1:1"]


def test_baselines_top_k_and_random_k() -> None:
    top = select([], CANDS, SelectionPolicy(baseline="top_k", k=2))
    assert ids(top) == ["pc:L1:0", "pc:L1:1", "pc:L2:0", "pc:L2:1"] and "baseline top_k" in top.notes
    assert ids(select([], CANDS, SelectionPolicy(baseline="top_k", k=3, per_layer=False))) == [
        "pc:L1:0",
        "pc:L2:0",
        "pc:L1:1",
    ]
    r1 = select([], CANDS, SelectionPolicy(baseline="random_k", k=2, seed=1))
    r1b = select([], CANDS, SelectionPolicy(baseline="random_k", k=2, seed=1))
    assert ids(r1) == ids(r1b) and len(ids(r1)) == 4
    assert sum(1 for s in r1.selected if s.layer == 1) == 2
    seeds = {
        tuple(ids(select([], CANDS, SelectionPolicy(baseline="random_k", k=2, seed=s)))) for s in range(6)
    }
    assert len(seeds) > 1
    assert ids(select([], CANDS, SelectionPolicy(baseline="top_k", k=2, ranking="missing"))) == []


def test_nothing_selected_is_a_clear_outcome(tmp_path: Path) -> None:
    dirs = {c.id: torch.nn.functional.normalize(torch.randn(8), dim=0) for c in CANDS}
    none = select([], CANDS)
    assert none.selected == [] and "no candidate has a scored verdict" in none.notes
    benign = select([record("pc:L1:0", "code"), record("pc:L1:1", "weather")], CANDS)
    assert benign.selected == [] and "none of 2 judged candidates" in benign.notes
    unscored = [VerdictRecord(candidate="pc:L1:0", judge="j", unscored="parse_failure: x")]
    sel = select(unscored, CANDS)
    assert sel.unscored == ["pc:L1:0"] and sel.considered == 0
    sub = write_selection(tmp_path, benign, dirs)
    assert sub.is_empty
    loaded = Subspace.load(tmp_path / "subspace")
    assert loaded.is_empty and loaded.d_model == 8
    saved = json.loads((tmp_path / "selection.json").read_text())
    assert saved["selected"] == [] and "nothing selected" in saved["notes"]


def test_subspace_provenance_and_dependent_vectors(tmp_path: Path) -> None:
    v = torch.zeros(3, 8)
    v[0, 0], v[1, 1] = 1.0, 1.0
    v[2] = v[0] * 2  # parallel to the first: dropped with its provenance record
    dirs = {"pc:L1:0": v[0], "pc:L1:1": v[1], "pc:L1:2": v[2], "pc:L2:0": v[1]}
    sel = Selection(
        selected=[
            SelectedColumn(candidate="pc:L1:0", layer=1, label="a", relation="undesired", confidence=0.9),
            SelectedColumn(candidate="pc:L1:2", layer=1, label="c", relation="undesired", confidence=0.8),
            SelectedColumn(candidate="pc:L1:1", layer=1, label="b", relation="undesired", confidence=0.7),
            SelectedColumn(candidate="pc:L2:0", layer=2, label="d", relation="undesired", confidence=0.7),
        ]
    )
    sub = build_subspace(sel, dirs, model="tiny")
    assert sub.total_dims == 3 and [c.candidate for c in sub.columns[1]] == ["pc:L1:0", "pc:L1:1"]
    sub.save(tmp_path)
    meta = json.loads((tmp_path / "subspace.json").read_text())
    first = meta["layers"]["1"][0]
    assert first["candidate"] == "pc:L1:0" and first["label"] == "a" and first["verdict"] == "undesired"
    assert first["extra"]["confidence"] == 0.9
    with pytest.raises(SubspaceError, match="no direction"):
        build_subspace(Selection(selected=[SelectedColumn(candidate="pc:L7:0", layer=7)]), dirs)


def test_inputs_are_validated(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no dossiers"):
        load_dossiers(tmp_path)
    ev = write_evidence(tmp_path, [make_dossier("pc:L1:0", 1, "evil")])
    assert [d.candidate.id for d in load_dossiers(ev)] == ["pc:L1:0"]
    (ev / "dossiers" / "broken.json").write_text('{"candidate": {"id": 3}}')
    with pytest.raises(DataError, match=r"broken\.json is not a valid dossier"):
        load_dossiers(ev)
    (ev / "dossiers" / "broken.json").unlink()
    dirs = load_directions(tmp_path / "diff" / "directions.safetensors")
    assert set(dirs) == {"pc:L1:0"} and dirs["pc:L1:0"].shape == (16,)
    with JsonlWriter(tmp_path / "v.jsonl") as w:
        w.write(VerdictRecord(candidate="a", judge="j", unscored="provider_error: x").model_dump())
        w.write(record("a", "evil", judge="j").model_dump())
    assert [r.verdict is not None for r in load_verdicts(tmp_path / "v.jsonl")] == [True]
    (tmp_path / "bad.jsonl").write_text('{"candidate": "a"}\n')
    with pytest.raises(DataError, match="record 1"):
        load_verdicts(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="not found"):
        apply_selection(tmp_path / "nope.json")


def test_prefilter_rank_orders_by_the_cheap_judge() -> None:
    from caft.agent.selection import prefilter_rank

    def off(cid: str, **kw: object) -> VerdictRecord:
        return VerdictRecord.model_validate(
            {"candidate": cid, "judge": "off", "method": "offline-embedding", **kw}
        )

    recs = [
        off("a", scores={"z": 0.5}),
        off("b", scores={"z": 2.5}),
        off("c", scores={"z": -1.0}),
        record("d", "evil", 1.0),
    ]  # an LLM verdict: not part of this ranking
    assert prefilter_rank(recs, "offline-embedding") == ["b", "a", "c"]
    assert prefilter_rank([off("x", relevance=20.0), off("y", relevance=80.0)], "offline-embedding") == [
        "y",
        "x",
    ]
    assert prefilter_rank(recs, "single") == ["d"]
