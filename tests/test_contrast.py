"""Minimal pairs from concept words: the swaps, the responses (mean, spread, share), the contrast basis, the
offline judge's contrast scoring, and the loop's subspace merge."""

from __future__ import annotations

import pytest
import torch

from caft.agent.config import OfflineJudgeConfig
from caft.agent.offline import OfflineJudge
from caft.app.loop import merge_subspaces
from caft.app.spurious import SPECS
from caft.errors import DataError
from caft.interp.contrast import (
    ConceptShifts,
    basis_directions,
    build_pairs,
    check_concepts,
    contrast_candidates,
    responses,
)
from caft.interp.schema import Candidate, ConceptResponse, Dossier
from caft.subspace import Column, Subspace

SENT = {"positive": ["great", "lovely"], "negative": ["awful", "bad"]}


def test_pairs_swap_every_word_of_one_value_and_keep_the_rest() -> None:
    texts = [
        "Great food, lovely people.",  # two positive words: both swapped
        "The bus was late.",  # no concept word: skipped
        "A bad and great day.",  # both values: ambiguous, skipped
        "It was awful",
        "It was awful",  # a duplicate text gives one pair
    ]
    pairs = build_pairs(texts, SENT, seed=0, max_pairs=10)
    assert len(pairs) == 2
    first, second = pairs
    assert first.low == "Great food, lovely people."
    hi_words = first.high.replace(",", "").replace(".", "").split()
    assert hi_words[0] in ("Awful", "Bad") and hi_words[2] in ("awful", "bad")  # case kept
    assert hi_words[1] == "food" and hi_words[3] == "people"
    # oriented first value -> second: the negative original is the `high` side
    assert second.high == "It was awful" and second.low.split()[-1] in ("great", "lovely")
    assert build_pairs(texts, SENT, seed=0, max_pairs=10) == pairs  # deterministic
    assert len(build_pairs(texts, SENT, seed=0, max_pairs=1)) == 1


def test_concepts_need_two_disjoint_values() -> None:
    check_concepts({"sentiment": SENT})
    with pytest.raises(DataError, match="exactly two"):
        check_concepts({"sentiment": {"positive": ["good"]}})
    with pytest.raises(DataError, match="both values"):
        check_concepts({"x": {"a": ["good", "odd"], "b": ["Good"]}})
    with pytest.raises(DataError, match="at least one word"):
        check_concepts({"x": {"a": ["good"], "b": []}})


def _shifts() -> ConceptShifts:
    gen = torch.Generator().manual_seed(0)
    mean = torch.zeros(8)
    mean[0] = 2.0
    x = mean + 0.1 * torch.randn(50, 8, generator=gen)
    return ConceptShifts("sentiment", ("positive", "negative"), {3: x})


def test_responses_report_mean_spread_count_and_share() -> None:
    s = _shifts()
    on = responses([s], 3, torch.eye(8)[0] * 5)  # any length: the direction is normalized
    assert on == [
        ConceptResponse(
            id="contrast:sentiment",
            concept="sentiment",
            values=["positive", "negative"],
            mean=on[0].mean,
            std=on[0].std,
            n=50,
            share=on[0].share,
            effect=on[0].effect,
        )
    ]
    assert on[0].mean == pytest.approx(2.0, abs=0.05) and on[0].share == pytest.approx(1.0, abs=0.01)
    assert 0.05 < on[0].std < 0.2 and on[0].effect > 10
    off = responses([s], 3, torch.eye(8)[5])[0]
    assert abs(off.share) < 0.05
    flipped = responses([s], 3, -torch.eye(8)[0])[0]
    assert flipped.share == pytest.approx(-1.0, abs=0.01)
    assert responses([s], 2, torch.eye(8)[0]) == []  # no shifts at that layer


def test_contrast_basis_starts_with_the_mean_shift_and_is_orthonormal() -> None:
    s = _shifts()
    vecs = torch.stack(basis_directions(s.shifts[3], 3))
    assert vecs.shape == (3, 8)
    assert torch.allclose(vecs @ vecs.T, torch.eye(3), atol=1e-4)
    assert abs(float(vecs[0, 0])) > 0.99
    cands, dirs = contrast_candidates([ConceptShifts("word order", ("a", "b"), s.shifts)], 2)
    assert [c.id for c in cands] == ["vec:L3:ct-word-order-0", "vec:L3:ct-word-order-1"]
    assert {c.source for c in cands} == {"contrast:word order"} and set(dirs) == {c.id for c in cands}
    assert cands[0].scores["contrast_share"] > cands[1].scores["contrast_share"]


def _dossier(cid: str, layer: int, sent: float, topic: float) -> Dossier:
    def r(concept: str, share: float) -> ConceptResponse:
        return ConceptResponse(
            id=f"contrast:{concept}", concept=concept, values=["a", "b"], mean=share, std=0.1, n=20,
            share=share, effect=share / 0.1,
        )  # fmt: skip

    cand = Candidate(id=cid, kind="vector", layer=layer, index=0)
    return Dossier(candidate=cand, contrast=[r("sentiment", sent), r("topic", topic)])


def test_offline_judge_scores_by_contrast_and_reads_which_concept_is_undesired(minilm_dir: object) -> None:
    from caft.agent.embedder import TextEmbedder

    task = SPECS["topic-sentiment"].task  # intended: topic; undesired: sentiment
    emb = TextEmbedder(str(minilm_dir))
    cfg = OfflineJudgeConfig(use_contrast=True, contrast_veto=2, contrast_min_share=0.5)
    judge = OfflineJudge(task, cfg, embedder=emb)
    assert judge.concept_margin("sentiment") > 0 > judge.concept_margin("topic")
    gen = torch.Generator().manual_seed(1)
    nulls = [
        _dossier(f"vec:L0:null{i}", 0, float(x), float(y))
        for i, (x, y) in enumerate(0.05 * torch.randn(10, 2, generator=gen))
    ]
    cands = [
        _dossier("vec:L0:sent", 0, 0.95, 0.02),  # the undesired concept's shift
        _dossier("vec:L0:topic", 0, 0.02, 0.95),  # the intended one's
        _dossier("vec:L0:mixed", 0, 0.5, 0.3),  # both: vetoed
        _dossier("vec:L0:weak", 0, 0.3, 0.0),  # undesired but below the minimum share
    ]
    verdicts = {v.candidate: v for v in judge.judge(cands, nulls)}
    sent = verdicts["vec:L0:sent"]
    assert sent.verdict is not None and sent.verdict.relation == "undesired"
    assert "contrast:sentiment" in sent.verdict.evidence and sent.scores["share_undesired"] == 0.95
    for cid, relation in (("vec:L0:topic", "intended"), ("vec:L0:mixed", "unrelated")):
        v = verdicts[cid].verdict
        assert v is not None and v.relation == relation, cid
    weak = verdicts["vec:L0:weak"]
    assert weak.scores["z"] > cfg.z_threshold and weak.verdict is not None
    assert weak.verdict.relation != "undesired"
    # without use_contrast the same dossiers (no windows) are not scored by contrast at all
    plain = OfflineJudge(task, OfflineJudgeConfig(), embedder=emb).judge(cands, nulls)
    assert all("share_undesired" not in v.scores for v in plain)


def test_loop_merge_adds_only_new_directions_with_their_round() -> None:
    eye = torch.eye(6)
    old = Subspace.from_vectors({1: eye[:2]}, d_model=6, provenance={1: [Column("a"), Column("b")]})
    new = Subspace.from_vectors(
        {1: torch.stack([eye[0], eye[3]]), 2: eye[4:5]},
        d_model=6,
        provenance={1: [Column("dup"), Column("c")], 2: [Column("d")]},
    )
    merged = merge_subspaces(old, new, "round1")
    assert merged.total_dims == 4  # eye[0] is already in the old span: dropped
    assert [c.candidate for c in merged.columns[1]] == ["a", "b", "c"]
    assert merged.columns[1][2].extra == {"round": "round1"} and merged.columns[1][0].extra == {}
    assert [c.candidate for c in merged.columns[2]] == ["d"]
