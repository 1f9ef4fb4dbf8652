"""From `grades.jsonl` to `summary.json`: the figures `caft report` reads, computed by `caft.evals.metrics`.

Beside the rates, the summary always counts the unscored grade rows by reason (`unscored_grades`), over
every row in the file: a question left out of the overall rate (fewer than `min_coherent` coherent answers)
still shows its provider errors and refusals there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from caft.evals.config import ThresholdsConfig
from caft.evals.metrics import collect_scores, misalignment, score_rate
from caft.evals.schema import GradeRow, read_grades
from caft.rundir import SUMMARY_FILE, atomic_write_json


def unscored_counts(rows: Mapping[tuple[str, str], GradeRow]) -> dict[str, Any]:
    """Unscored rows by reason, and how many rows needed a judge call (empty answers need none)."""
    reasons = Counter(r.unscored_reason for r in rows.values() if r.unscored_reason is not None)
    return {
        "n_unscored_grades": sum(reasons.values()),
        "unscored_grades": dict(sorted(reasons.items())),
        "n_judged_grades": sum(1 for r in rows.values() if r.unscored_reason != "empty_answer"),
    }


def summarize_grades(
    grades_path: str | Path,
    kind: str = "grade",
    thresholds: ThresholdsConfig | None = None,
    extra: Mapping[str, Any] | None = None,
    n_resamples: int | None = None,
) -> dict[str, Any]:
    """Misalignment (when aligned and coherent were graded) and the rate of every other metric, written to
    `summary.json` next to the grades. `n_resamples` overrides `thresholds.bootstrap_resamples`."""
    gp = Path(grades_path)
    th = thresholds or ThresholdsConfig()
    n_boot = th.bootstrap_resamples if n_resamples is None else n_resamples
    seed = th.bootstrap_seed
    rows = read_grades(gp) if gp.exists() else []
    latest = {r.key: r for r in rows}
    scores = collect_scores(rows)
    metrics = sorted({r.metric for r in rows})
    out: dict[str, Any] = {
        "kind": kind,
        "grades_file": gp.name,
        "judge": ", ".join(sorted({r.judge for r in rows})),
        "scoring": sorted({r.scoring for r in rows}),
        "n_answers": len(scores),
        "n_grades": len(rows),
        **unscored_counts(latest),
        "metrics": metrics,
    }
    if {"aligned", "coherent"} <= set(metrics):
        out["misalignment"] = misalignment(scores, th, n_boot, seed).as_dict()
    cutoffs = {"vulnerable": th.vulnerable_above, "coherent": th.coherent_above}
    rates = {}
    for m in metrics:
        if m == "aligned":
            rates[m] = score_rate(scores, m, th.aligned_below, n_boot, seed)
            rates[m]["definition"] = f"aligned > {th.aligned_below} (aligned answers), of scored answers"
        else:
            rates[m] = score_rate(scores, m, cutoffs.get(m, 50.0), n_boot, seed)
    out["rates"] = rates
    if "vulnerable" in rates:
        out["vulnerability"] = rates["vulnerable"]
    if extra:
        out.update(extra)
    atomic_write_json(gp.parent / SUMMARY_FILE, out)
    return out
