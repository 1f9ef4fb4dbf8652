"""Judge agreement: Krippendorff's alpha (interval), Cohen's and Fleiss' kappa, consensus and the disagreement
list, checked against hand computation and a published example."""

from __future__ import annotations

from itertools import permutations

import pytest
from stats_helpers import load_golden

from caft.evals.agreement_stats import (
    cohen_kappa,
    disagreements_markdown,
    fleiss_kappa,
    judge_agreement,
    krippendorff_alpha_interval,
)
from caft.evals.stats import AnswerRecord, EMRule

N = None


def test_alpha_hand_computed_tiny() -> None:
    # Units (two judges): (10, 20), (30, 30), (50, missing), (70, 90). The third unit has one value and is
    # not pairable; the pairable values are 10 20 30 30 70 90 (n = 6).
    # D_o = (1/n) sum_u sum_{i != j} (v_i - v_j)^2 / (m_u - 1) = (2*10^2 + 0 + 2*20^2) / 6 = 1000 / 6.
    # D_e = sum_{c != k} (v_c - v_k)^2 / (n (n - 1)): sum of squares 15300, sum 250, so the ordered-pair sum is
    # 2 (6 * 15300 - 250^2) = 58600, / 30.
    d_o = 1000 / 6
    d_e = 2 * (6 * 15300 - 250**2) / 30
    assert krippendorff_alpha_interval([(10, 20), (30, 30), (50, N), (70, 90)]) == pytest.approx(
        1 - d_o / d_e
    )
    assert 1 - d_o / d_e == pytest.approx(268 / 293)


def test_alpha_published_example() -> None:
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders x 12 units with missing
    # values; the interval alpha reported there is 0.849.
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
        [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
    ]
    units = list(zip(*coders, strict=True))
    assert krippendorff_alpha_interval(units) == pytest.approx(0.849, abs=5e-4)


def test_alpha_edges() -> None:
    assert krippendorff_alpha_interval([(5, 5), (60, 60)]) == 1.0
    assert krippendorff_alpha_interval([(5, 5), (5, 5)]) is None  # no variation: undefined
    assert krippendorff_alpha_interval([(5, N), (N, 7)]) is None  # nothing pairable
    # Judges that disagree systematically more than chance: alpha < 0.
    alpha = krippendorff_alpha_interval([(0, 100), (100, 0)])
    assert alpha is not None and alpha < 0


def test_cohen_and_fleiss_hand_computed() -> None:
    # p_o = 3/4; p_A = 1/2, p_B = 1/4 -> p_e = 1/8 + 3/8 = 1/2; kappa = (3/4 - 1/2) / (1/2) = 1/2.
    assert cohen_kappa([True, True, False, False], [True, False, False, False]) == pytest.approx(0.5)
    assert cohen_kappa([True, False], [True, False]) == 1.0
    assert cohen_kappa([True, True], [True, True]) is None  # p_e = 1
    with pytest.raises(ValueError, match="same length"):
        cohen_kappa([True], [])
    # Fleiss, 3 raters x 4 items: P_i = (2*1 + 1*0)/6 = 1/3, 1, 1, 1/3 -> P_bar = 2/3; p_yes = 6/12 -> P_e = 1/2;
    # kappa = (2/3 - 1/2) / (1/2) = 1/3.
    items = [[True, True, False], [True, True, True], [False, False, False], [True, False, False]]
    assert fleiss_kappa(items) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[True, False], [True]])


def _golden_judges() -> dict[str, list[AnswerRecord]]:
    g = load_golden()
    return {"judge-a": g["judge-a", "ft"], "judge-b": g["judge-b", "ft"]}


def test_golden_kappa_consensus_and_disagreements() -> None:
    res = judge_agreement(_golden_judges(), EMRule(min_coherent=3))
    assert res.judges == ["judge-a", "judge-b"] and res.n_answers == 15
    # Labelled by both: all but ft-q1-5 (a: provider_error), ft-q2-5 (both unscored), ft-q3-3 (b: code) = 12.
    # Both misaligned: q1-1, q2-1, q3-1, q3-2 (4); a only: q1-2 (b has 45/75); b only: q2-3 (a has 29.9/50,
    # incoherent; b 26/58); neither: 6. p_o = 10/12, p_a = p_b = 5/12, p_e = (25 + 49)/144.
    (pair,) = res.pairwise_kappa
    p_o, p_e = 10 / 12, (25 + 49) / 144
    assert pair.n == 12 and pair.agreement == pytest.approx(p_o)
    assert pair.kappa == pytest.approx((p_o - p_e) / (1 - p_e))
    assert pair.kappa == pytest.approx(23 / 35)
    assert pair.rate_a == pytest.approx(5 / 12) and pair.rate_b == pytest.approx(5 / 12)
    assert res.mean_pairwise_kappa == pytest.approx(23 / 35)
    # Consensus of two judges = both say misaligned: 4 of the 12 labelled by both.
    assert res.n_all_labelled == 12
    assert (res.consensus.k, res.consensus.n) == (4, 12)
    assert res.judge_rates == pytest.approx({"judge-a": 5 / 12, "judge-b": 5 / 12})
    assert res.max_ratio_to_consensus == pytest.approx((5 / 12) / (4 / 12))
    assert res.consensus.ci_low is not None and res.consensus.ci_high is not None
    assert res.consensus.ci_low <= 1 / 3 <= res.consensus.ci_high
    kinds = [(d.answer_id, d.kind) for d in res.disagreements]
    assert kinds == [
        ("ft-q1-2", "label"),
        ("ft-q1-5", "coverage"),
        ("ft-q2-3", "label"),
        ("ft-q3-3", "coverage"),
    ]
    q15 = res.disagreements[1].judges
    assert q15["judge-a"].misaligned is None and q15["judge-a"].unscored_reason == "provider_error"
    assert q15["judge-b"].aligned == 55.0 and q15["judge-b"].misaligned is False
    md = disagreements_markdown(res)
    assert "| ft-q1-2 | q1 | label |" in md and "unscored (provider_error)" in md
    assert "more not shown" in disagreements_markdown(res, limit=1)


def _alpha_by_definition(pairs: list[tuple[float, float]]) -> float:
    """Alpha for two judges who both scored every unit, from the coincidence pairs written out: each unit
    contributes its two ordered pairs (m_u - 1 = 1), the expected disagreement uses every ordered pair of
    distinct values."""
    values = [v for p in pairs for v in p]
    n = len(values)
    d_o = sum((a - b) ** 2 + (b - a) ** 2 for a, b in pairs) / n
    d_e = sum((x - y) ** 2 for x, y in permutations(values, 2)) / (n * (n - 1))
    return 1 - d_o / d_e


def test_golden_alpha_overall_and_per_question() -> None:
    res = judge_agreement(_golden_judges(), EMRule(min_coherent=3))
    # Aligned scores (judge-a, judge-b) where both scored; ft-q1-5 and ft-q3-3 have one value and drop out.
    aligned = {
        "q1": [(10.2, 14.0), (25.5, 45.0), (65.0, 70.0), (5.0, 8.0)],
        "q2": [(18.0, 22.0), (80.0, 85.0), (29.9, 26.0), (30.0, 35.0)],
        "q3": [(8.0, 5.0), (12.0, 18.0), (77.0, 81.0), (50.0, 45.0)],
    }
    coherent = {
        "q1": [(85.0, 80.0), (72.3, 75.0), (90.0, 88.0), (20.0, 25.0)],
        "q2": [(66.0, 70.0), (81.0, 83.0), (50.0, 58.0), (88.0, 90.0)],
        "q3": [(93.0, 95.0), (79.0, 72.0), (82.0, 85.0), (40.0, 52.0)],
    }
    all_aligned = [p for q in aligned.values() for p in q]
    all_coherent = [p for q in coherent.values() for p in q]
    assert res.alpha["aligned"] == pytest.approx(_alpha_by_definition(all_aligned))
    assert res.alpha["coherent"] == pytest.approx(_alpha_by_definition(all_coherent))
    for q in aligned:
        assert res.alpha_per_question[q]["aligned"] == pytest.approx(_alpha_by_definition(aligned[q]))
        assert res.alpha_per_question[q]["coherent"] == pytest.approx(_alpha_by_definition(coherent[q]))
    assert res.alpha["aligned"] is not None and 0.8 < res.alpha["aligned"] < 1.0


def test_three_judges_fleiss_and_majority() -> None:
    def rec(aid: str, q: str, aligned: float | None) -> AnswerRecord:
        return AnswerRecord(
            q, aid, "m", aligned, None if aligned is None else 90.0, None if aligned else "refusal"
        )

    # Misaligned labels per answer (j1, j2, j3): a1 T T F, a2 T T T, a3 F F F, a4 T F F, a5 unscored by j3.
    grid = {
        "a1": (10, 10, 90),
        "a2": (10, 10, 10),
        "a3": (90, 90, 90),
        "a4": (10, 90, 90),
        "a5": (10, 10, None),
    }
    grades = {
        j: [rec(a, "q1" if a in ("a1", "a2") else "q2", v[i]) for a, v in grid.items()]
        for i, j in enumerate(["j1", "j2", "j3"])
    }
    res = judge_agreement(grades, EMRule(min_coherent=0))
    assert res.n_all_labelled == 4
    assert res.fleiss_kappa == pytest.approx(1 / 3)  # the four complete items of the hand example above
    # Majority (2 of 3): a1 yes, a2 yes, a3 no, a4 no -> 2/4. j1 flags 3/4: 1.5x the consensus.
    assert (res.consensus.k, res.consensus.n) == (2, 4)
    assert res.judge_rates == pytest.approx({"j1": 0.75, "j2": 0.5, "j3": 0.25})
    assert res.max_ratio_to_consensus == pytest.approx(1.5)
    assert [(p.judge_a, p.judge_b, p.n) for p in res.pairwise_kappa] == [
        ("j1", "j2", 5),
        ("j1", "j3", 4),
        ("j2", "j3", 4),
    ]
    # j1 vs j2 over a1..a5: labels TTFTT vs TTFFT -> p_o 4/5, p_1 4/5, p_2 3/5, p_e 12/25 + 2/25 = 14/25.
    assert res.pairwise_kappa[0].kappa == pytest.approx((4 / 5 - 14 / 25) / (1 - 14 / 25))
    assert [d.answer_id for d in res.disagreements] == ["a1", "a4", "a5"]
    assert res.disagreements[2].kind == "coverage"


def test_agreement_input_errors() -> None:
    with pytest.raises(ValueError, match="at least two judges"):
        judge_agreement({"only": []})
    with pytest.raises(ValueError, match="same answer for every judge"):
        judge_agreement({"a": [AnswerRecord("q1", "x")], "b": [AnswerRecord("q2", "x")]})
    with pytest.raises(ValueError, match="twice"):
        judge_agreement({"a": [AnswerRecord("q1", "x"), AnswerRecord("q1", "x")], "b": []})
