"""Judge agreement: the same answers scored by two judges (`caft grade --rescore`), compared.

Judge choice moves misalignment numbers by an order of magnitude (one fixed answer set gave 9.85%, 5.75% and
0.50% with three judges), so a study should show how two judges agree: per metric the correlation of scores on
answers both scored (Pearson and Spearman), the mean difference, how often each left an answer unscored, and
the rates that the thresholds produce under each judge, side by side with their difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from caft.evals.config import ThresholdsConfig
from caft.evals.metrics import AnswerScores, collect_scores, misalignment
from caft.evals.schema import GradeRow, read_grades


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    return pearson(_ranks(a), _ranks(b)) if len(a) >= 2 else None


def _judge(rows: Iterable[GradeRow]) -> str:
    return ", ".join(sorted({r.judge for r in rows}))


def compare(
    grades_a: str | Path,
    grades_b: str | Path,
    thresholds: ThresholdsConfig | None = None,
    n_resamples: int | None = None,
) -> dict[str, Any]:
    """Agreement between two grade files over the answers they share."""
    th = thresholds or ThresholdsConfig()
    seed = th.bootstrap_seed
    rows_a, rows_b = read_grades(grades_a), read_grades(grades_b)
    a, b = collect_scores(rows_a), collect_scores(rows_b)
    common = sorted(set(a) & set(b))
    metrics = sorted({r.metric for r in rows_a} & {r.metric for r in rows_b})
    cut = {
        "aligned": ("<", th.aligned_below),
        "coherent": (">", th.coherent_above),
        "vulnerable": (">", th.vulnerable_above),
    }
    per_metric: dict[str, Any] = {}
    for m in metrics:
        pairs = [(a[i].scores.get(m), b[i].scores.get(m)) for i in common]
        both = [(x, y) for x, y in pairs if x is not None and y is not None]
        xa = np.asarray([x for x, _ in both], dtype=np.float64)
        xb = np.asarray([y for _, y in both], dtype=np.float64)
        entry: dict[str, Any] = {
            "n_common": len(pairs),
            "n_both_scored": len(both),
            "unscored_a": sum(1 for x, _ in pairs if x is None),
            "unscored_b": sum(1 for _, y in pairs if y is None),
            "pearson": pearson(xa, xb),
            "spearman": spearman(xa, xb),
            "mean_a": float(xa.mean()) if len(both) else None,
            "mean_b": float(xb.mean()) if len(both) else None,
            "mean_diff_b_minus_a": float((xb - xa).mean()) if len(both) else None,
            "mean_abs_diff": float(np.abs(xb - xa).mean()) if len(both) else None,
        }
        if m in cut and len(both):
            op, t = cut[m]
            hit_a = xa < t if op == "<" else xa > t
            hit_b = xb < t if op == "<" else xb > t
            entry["rule"] = f"{m} {op} {t:g}"
            entry["rate_a"] = float(hit_a.mean())
            entry["rate_b"] = float(hit_b.mean())
            entry["rate_diff"] = entry["rate_b"] - entry["rate_a"]
            entry["label_agreement"] = float((hit_a == hit_b).mean())
        per_metric[m] = entry
    out: dict[str, Any] = {
        "judge_a": _judge(rows_a),
        "judge_b": _judge(rows_b),
        "n_answers_a": len(a),
        "n_answers_b": len(b),
        "n_common": len(common),
        "metrics": per_metric,
    }
    if {"aligned", "coherent"} <= set(metrics):
        sub_a: dict[str, AnswerScores] = {i: a[i] for i in common}
        sub_b: dict[str, AnswerScores] = {i: b[i] for i in common}
        ma = misalignment(sub_a, th, n_resamples, seed).overall
        mb = misalignment(sub_b, th, n_resamples, seed).overall
        out["misaligned"] = {
            "of_coherent": {"a": ma.of_coherent.as_dict(), "b": mb.of_coherent.as_dict()},
            "of_scored": {"a": ma.of_scored.as_dict(), "b": mb.of_scored.as_dict()},
        }
    return out


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.2f}%" if pct else f"{v:.3f}"


def agreement_markdown(result: Mapping[str, Any]) -> str:
    """The agreement table as markdown."""
    lines = [
        "# Judge agreement",
        "",
        f"A = {result['judge_a']}; B = {result['judge_b']}; {result['n_common']} answers graded by both.",
        "",
        "| metric | both scored | unscored A | unscored B | Pearson r | Spearman rho | mean A | mean B | mean B-A "
        "| rule | rate A | rate B | B-A | same label |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, e in result["metrics"].items():
        lines.append(
            f"| {m} | {e['n_both_scored']} | {e['unscored_a']} | {e['unscored_b']} | {_f(e['pearson'])} "
            f"| {_f(e['spearman'])} | {_f(e['mean_a'])} | {_f(e['mean_b'])} | {_f(e['mean_diff_b_minus_a'])} "
            f"| {e.get('rule', '')} | {_f(e.get('rate_a'), True)} | {_f(e.get('rate_b'), True)} "
            f"| {_f(e.get('rate_diff'), True)} | {_f(e.get('label_agreement'), True)} |"
        )
    mis = result.get("misaligned")
    if mis:
        lines += ["", "| misaligned | A | B | B-A |", "|---|---|---|---|"]
        for denom in ("of_coherent", "of_scored"):
            ra, rb = mis[denom]["a"]["rate"], mis[denom]["b"]["rate"]
            diff = None if ra is None or rb is None else rb - ra
            lines.append(f"| {denom} | {_f(ra, True)} | {_f(rb, True)} | {_f(diff, True)} |")
    return "\n".join(lines) + "\n"
