"""Question-clustered bootstrap and a question-level sign-flip test, over categorical answer counts.

Every EM figure is a function of how many answers of each question fall in each category (misaligned,
coherent and not misaligned, incoherent), so the input here is a count table `counts` of shape (Q, C): one row
per question (cluster), one column per category. A ratio figure is `sum(counts @ numerator) / sum(counts @
denominator)` with one weight per category.

Two-stage bootstrap: draw Q questions with replacement, then, for each drawn question, draw its n_q answers with
replacement. Drawing n_q answers with replacement from a question is a multinomial draw over its categories with
probabilities counts[q] / n_q, so that is how it is done (no index arrays). The iid bootstrap (answers pooled,
questions ignored) is one multinomial over the pooled counts. Both are seeded; the CI is the percentile interval
(numpy's default linear interpolation), and resamples whose denominator is 0 are skipped, as in
`caft.evals.metrics.bootstrap_ci`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
# Resample draws are made in chunks of at most this many integers, to keep memory flat on large question sets.
_CHUNK_ELEMS = 4_000_000


def as_counts(counts: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """A (Q, C) table of non-negative integer counts, checked."""
    table = np.asarray(counts, dtype=np.int64)
    if table.ndim != 2:
        raise ValueError(f"counts must be a (questions, categories) table, got shape {table.shape}")
    if (table < 0).any():
        raise ValueError("counts must be non-negative")
    return table


def two_stage_draws(
    counts: Sequence[np.ndarray], n_resamples: int, rng: np.random.Generator
) -> Iterator[list[np.ndarray]]:
    """Chunks of two-stage resamples: for each table in `counts` (all (Q, C), same questions in the same
    order) a (b, Q, C) array of resampled category counts per drawn question slot. The question draw is
    shared by all tables (a paired resample); the answer draws are independent per table."""
    if not counts:
        raise ValueError("two_stage_draws needs at least one count table")
    n_q, n_c = counts[0].shape
    if any(c.shape != (n_q, n_c) for c in counts):
        raise ValueError("all count tables must have the same (questions, categories) shape")
    if n_q == 0:
        return
    sizes = [c.sum(axis=1) for c in counts]
    probs = [c / np.maximum(s, 1)[:, None] for c, s in zip(counts, sizes, strict=True)]
    per_chunk = max(1, _CHUNK_ELEMS // (n_q * n_c * len(counts)))
    left = n_resamples
    while left > 0:
        b = min(per_chunk, left)
        left -= b
        drawn = rng.integers(0, n_q, size=(b, n_q))  # (b, Q) question index per slot
        yield [rng.multinomial(s[drawn], p[drawn]) for s, p in zip(sizes, probs, strict=True)]


def pooled_draws(
    counts: Sequence[Sequence[int]] | np.ndarray,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    clustered: bool = True,
) -> np.ndarray:
    """(B, C) pooled category counts of `n_resamples` bootstrap resamples: two-stage (questions, then answers
    within each drawn question) when `clustered`, else answers pooled and resampled as if independent (one
    multinomial over the pooled counts). Any ratio figure of the resamples is `draws @ numerator / draws @
    denominator`, so one set of draws serves every figure of a group."""
    table = as_counts(counts)
    rng = np.random.default_rng(seed)
    if not clustered:
        pooled = table.sum(axis=0)
        total = int(pooled.sum())
        if total == 0:
            return np.zeros((n_resamples, table.shape[1]), dtype=np.int64)
        return rng.multinomial(total, pooled / total, size=n_resamples)
    chunks = [chunk.sum(axis=1) for (chunk,) in two_stage_draws([table], n_resamples, rng)]
    return np.concatenate(chunks) if chunks else np.zeros((n_resamples, table.shape[1]), dtype=np.int64)


def ratio_draws(draws: np.ndarray, numerator: Sequence[float], denominator: Sequence[float]) -> np.ndarray:
    """The ratio figure of each resample in `draws` (B, C); resamples with a zero denominator are left out, so
    the result may be shorter than B."""
    num = draws @ np.asarray(numerator, dtype=np.float64)
    den = draws @ np.asarray(denominator, dtype=np.float64)
    ok = den > 0
    return num[ok] / den[ok]


def percentile_ci(draws: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float | None, float | None]:
    """The percentile interval of a bootstrap distribution; (None, None) when it is empty."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if draws.size == 0:
        return None, None
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired_difference_draws(
    counts_a: Sequence[Sequence[int]] | np.ndarray,
    counts_b: Sequence[Sequence[int]] | np.ndarray,
    numerator: Sequence[float],
    denominator: Sequence[float],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> np.ndarray:
    """Bootstrap distribution of ratio_b - ratio_a over the same questions: each resample draws the questions
    once for both models (the pairing), then each model's answers within each drawn question."""
    ta, tb = as_counts(counts_a), as_counts(counts_b)
    w_num, w_den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    out: list[np.ndarray] = []
    for ca, cb in two_stage_draws([ta, tb], n_resamples, np.random.default_rng(seed)):
        pa, pb = ca.sum(axis=1), cb.sum(axis=1)  # (b, C)
        na, da, nb, db = pa @ w_num, pa @ w_den, pb @ w_num, pb @ w_den
        ok = (da > 0) & (db > 0)
        out.append(nb[ok] / db[ok] - na[ok] / da[ok])
    return np.concatenate(out) if out else np.zeros(0)


def sign_flip_pvalue(
    counts_a: Sequence[Sequence[int]] | np.ndarray,
    counts_b: Sequence[Sequence[int]] | np.ndarray,
    numerator: Sequence[float],
    denominator: Sequence[float],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[float | None, bool]:
    """Two-sided p-value of ratio_b - ratio_a under the null that, within each question, the two models'
    answer sets are exchangeable: each question's pair is swapped or not with probability 1/2.

    All 2^Q swap patterns are enumerated when 2^Q <= `n_resamples` (exact p = share of patterns whose |T| is at
    least the observed |T|); otherwise `n_resamples` random patterns give p = (1 + hits) / (1 + n_resamples).
    Returns (p, exact); p is None when the statistic is undefined (a pooled denominator of 0)."""
    ta, tb = as_counts(counts_a), as_counts(counts_b)
    w_num, w_den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    num_a, den_a, num_b, den_b = ta @ w_num, ta @ w_den, tb @ w_num, tb @ w_den  # (Q,) each
    if den_a.sum() <= 0 or den_b.sum() <= 0:
        return None, False
    observed = abs(num_b.sum() / den_b.sum() - num_a.sum() / den_a.sum())
    n_q = len(num_a)
    exact = n_q < 63 and 2**n_q <= n_resamples
    if exact:
        patterns = (np.arange(2**n_q)[:, None] >> np.arange(n_q)[None, :]) & 1  # (2^Q, Q) swap bits
    else:
        patterns = np.random.default_rng(seed).integers(0, 2, size=(n_resamples, n_q))
    swap = patterns.astype(bool)
    na, nb = np.where(swap, num_b, num_a).sum(1), np.where(swap, num_a, num_b).sum(1)
    da, db = np.where(swap, den_b, den_a).sum(1), np.where(swap, den_a, den_b).sum(1)
    ok = (da > 0) & (db > 0)
    stat = np.abs(nb[ok] / db[ok] - na[ok] / da[ok])
    # A tolerance so that ties with the observed statistic (e.g. the identity pattern) count despite rounding.
    hits = int((stat >= observed - 1e-12).sum())
    if exact:
        return hits / int(ok.sum()), True
    return (1 + hits) / (1 + int(ok.sum())), False
