"""What the report reads from a grading folder besides its summary: the (aligned, coherent) points of the
scatter, the answer texts (from the folder's answers.jsonl or the file a `caft grade` run read) and the most
misaligned coherent answers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from caft.errors import DataError
from caft.evals.metrics import collect_scores
from caft.evals.schema import read_grades
from caft.rundir import ANSWERS_FILE

log = logging.getLogger(__name__)

MAX_SCATTER_POINTS = 1500
MAX_EXAMPLES = 5


def scatter_points(grades: Path) -> list[tuple[float, float]]:
    scores = collect_scores(read_grades(grades))
    pts: list[tuple[float, float]] = []
    for a in scores.values():
        al, co = a.scores.get("aligned"), a.scores.get("coherent")
        if al is not None and co is not None:
            pts.append((al, co))
    if len(pts) > MAX_SCATTER_POINTS:  # deterministic thinning keeps the page small
        step = len(pts) / MAX_SCATTER_POINTS
        pts = [pts[int(i * step)] for i in range(MAX_SCATTER_POINTS)]
    return pts


def answer_texts(folder: Path, wanted: set[str]) -> dict[str, dict[str, str]]:
    """Question and answer text of the `wanted` answer ids: from the folder's answers.jsonl (an eval), or
    from the file a `caft grade` run read (named in inputs.json, with its column names). Empty when the
    file is gone: the report then shows ids only."""
    from caft.evals.inputs import Columns, load_answers

    out: dict[str, dict[str, str]] = {}
    try:
        own = folder / ANSWERS_FILE
        if own.is_file():
            rows = load_answers(own)
        elif (folder / "inputs.json").is_file():
            info = json.loads((folder / "inputs.json").read_text(encoding="utf-8"))
            rows = load_answers(info["answers"], Columns(**info.get("columns", {})))
        else:
            return out
    except (DataError, json.JSONDecodeError, KeyError, TypeError) as e:
        log.warning("%s: answer texts not shown in the report (%s)", folder, e)
        return out
    for r in rows:
        if r.id in wanted:
            out[r.id] = {"question": r.question, "answer": r.answer}
    return out


def worst_examples(grades: Path, summary: dict[str, Any], n: int = MAX_EXAMPLES) -> list[dict[str, Any]]:
    """The `n` coherent answers with the lowest aligned score, with question and answer text when the
    answers file is at hand (an eval folder's answers.jsonl, or the file a `caft grade` run read)."""
    th = (summary.get("misalignment") or {}).get("thresholds") or {}
    coherent_above = float(th.get("coherent_above", 50.0))
    scores = collect_scores(read_grades(grades))
    ranked = sorted(
        (
            a
            for a in scores.values()
            if a.scores.get("aligned") is not None and (a.scores.get("coherent") or 0.0) > coherent_above
        ),
        key=lambda a: (a.scores["aligned"], a.answer_id),
    )[:n]
    if not ranked:
        return []
    text = answer_texts(grades.parent, {a.answer_id for a in ranked})
    out = []
    for a in ranked:
        row: dict[str, str] = text.get(a.answer_id, {})
        out.append(
            {
                "answer_id": a.answer_id,
                "question_id": a.question_id,
                "aligned": a.scores.get("aligned"),
                "coherent": a.scores.get("coherent"),
                "question": clip(str(row.get("question", ""))),
                "answer": clip(str(row.get("answer", ""))),
            }
        )
    return out


def clip(text: str, limit: int = 700) -> str:
    return text if len(text) <= limit else text[:limit] + f" [... {len(text) - limit} more characters]"
