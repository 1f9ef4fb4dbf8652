"""A paired comparison of two models over the same questions: the difference of a pooled EM rate with a
paired, question-clustered bootstrap CI and a question-level sign-flip p-value (see docs/evals.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from caft.evals.cluster_bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    paired_difference_draws,
    percentile_ci,
    sign_flip_pvalue,
)
from caft.evals.stats import (
    FIGURES,
    N_CATEGORIES,
    AnswerRecord,
    EMRule,
    Figure,
    Rule,
    by_question,
    count_row,
    coverage,
    min_coherent_flag,
)


@dataclass(frozen=True)
class PairedComparison:
    """rate_b - rate_a over the questions both models answered (and neither has flagged), with a paired
    clustered bootstrap CI and a question-level sign-flip p-value."""

    model_a: str
    model_b: str
    figure: str
    questions: list[str]
    rate_a: float | None
    rate_b: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_exact: bool
    per_question: list[dict[str, Any]]
    left_out: dict[str, str]
    n_resamples: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(row: np.ndarray, num: Sequence[int], den: Sequence[int]) -> float | None:
    d = int(row @ np.asarray(den))
    return int(row @ np.asarray(num)) / d if d else None


def compare_models(
    records_a: Iterable[AnswerRecord],
    records_b: Iterable[AnswerRecord],
    figure: Figure = "of_coherent",
    rule: Rule | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> PairedComparison:
    """Difference of a pooled rate (B minus A) between two models over the same questions.

    CI: paired two-stage bootstrap (each resample draws the questions once for both models, then each model's
    answers within each drawn question). p-value: two-sided sign-flip test that swaps the two models' answer
    sets per question (exact over all 2^Q patterns when 2^Q <= n_resamples, else seeded Monte Carlo)."""
    if figure not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}; choose one of {sorted(FIGURES)}")
    th = rule or EMRule()
    ra, rb = list(records_a), list(records_b)
    qa, qb = by_question(ra), by_question(rb)
    name_a = ", ".join(sorted({r.model for r in ra})) or "a"
    name_b = ", ".join(sorted({r.model for r in rb})) or "b"
    left_out: dict[str, str] = {}
    for q in sorted(set(qa) ^ set(qb)):
        left_out[q] = f"only answered by {name_a if q in qa else name_b}"
    questions: list[str] = []
    for q in sorted(set(qa) & set(qb)):
        why = [
            f"{n}: {f}"
            for n, recs in ((name_a, qa[q]), (name_b, qb[q]))
            if (f := min_coherent_flag(coverage(recs, th), th))
        ]
        if why:
            left_out[q] = "; ".join(why)
        else:
            questions.append(q)
    num, den = FIGURES[figure]
    ta = (
        np.stack([count_row(qa[q], th) for q in questions])
        if questions
        else np.zeros((0, N_CATEGORIES), np.int64)
    )
    tb = (
        np.stack([count_row(qb[q], th) for q in questions])
        if questions
        else np.zeros((0, N_CATEGORIES), np.int64)
    )
    rate_a, rate_b = _rate(ta.sum(axis=0), num, den), _rate(tb.sum(axis=0), num, den)
    diff = rate_b - rate_a if rate_a is not None and rate_b is not None else None
    lo, hi = percentile_ci(paired_difference_draws(ta, tb, num, den, n_resamples, seed), level)
    p, exact = sign_flip_pvalue(ta, tb, num, den, n_resamples, seed) if questions else (None, False)
    per_q = []
    for i, q in enumerate(questions):
        a, b = _rate(ta[i], num, den), _rate(tb[i], num, den)
        per_q.append(
            {
                "question_id": q,
                "rate_a": a,
                "rate_b": b,
                "difference": None if a is None or b is None else b - a,
            }
        )
    return PairedComparison(
        name_a,
        name_b,
        figure,
        questions,
        rate_a,
        rate_b,
        diff,
        lo,
        hi,
        p,
        exact,
        per_q,
        left_out,
        n_resamples,
        seed,
    )
