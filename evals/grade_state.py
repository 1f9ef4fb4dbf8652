"""What `grades.jsonl` already holds: the rows done, a check that they come from this judge and these
prompts, and the pairs still to grade."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from caft.errors import RunDirError
from caft.evals.inputs import AnswerRow
from caft.evals.schema import GradeRow, iter_grades
from caft.rundir import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["check_consistent", "pending_pairs", "read_done"]


def read_done(
    path: Path,
    drop_reasons: Sequence[str] = (),
    check: Callable[[Mapping[tuple[str, str], GradeRow]], None] | None = None,
) -> dict[tuple[str, str], GradeRow]:
    """The rows already in `grades.jsonl`, keyed by (answer_id, metric). `check` sees them first (and may
    refuse the file). When some rows have a reason in `drop_reasons` (e.g. provider_error, to retry them) the
    file is rewritten without them, atomically, so that the rerun still leaves one row per pair."""
    if not path.exists():
        return {}
    rows: dict[tuple[str, str], GradeRow] = {}
    dup = 0
    for row in iter_grades(path):
        if row.key in rows:
            dup += 1
        rows[row.key] = row
    if check is not None:
        check(rows)
    dropped = {k for k, r in rows.items() if r.unscored_reason in drop_reasons}
    if dup or dropped:
        keep = [r for k, r in rows.items() if k not in dropped]
        atomic_write_text(path, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in keep))
        if dup:
            log.warning("%s: %d duplicate rows collapsed (last one kept)", path, dup)
        if dropped:
            log.info("%s: %d provider_error rows will be graded again", path, len(dropped))
        rows = {k: r for k, r in rows.items() if k not in dropped}
    return rows


def check_consistent(
    done: Mapping[tuple[str, str], GradeRow], judge: str, hashes: Mapping[str, set[str]], path: Path
) -> None:
    """Refuse a file whose rows were graded by another judge, or with another prompt for a metric."""
    for (aid, metric), row in done.items():
        if row.judge != judge:
            raise RunDirError(
                f"{path} already holds grades by judge {row.judge!r} (e.g. answer {aid!r}, {metric}), "
                f"not {judge!r}. Use another --out folder, or `caft grade --rescore` to compare judges"
            )
        allowed = hashes.get(metric)
        if allowed is not None and row.prompt_hash not in allowed:
            raise RunDirError(
                f"{path} holds {metric!r} grades made with another judge prompt (hash {row.prompt_hash}); "
                "use another --out folder so grades from different prompts are not mixed"
            )


def pending_pairs(
    rows: Sequence[AnswerRow], metrics: Sequence[str], out_path: str | Path
) -> list[tuple[AnswerRow, str]]:
    """(answer, metric) pairs not yet in `out_path` (read only; nothing is rewritten)."""
    out = Path(out_path)
    done: set[tuple[str, str]] = set()
    if out.exists():
        done = {r.key for r in iter_grades(out) if r.unscored_reason != "provider_error"}
    return [(r, m) for r in rows for m in metrics if (r.id, m) not in done]
