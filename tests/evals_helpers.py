"""Shared helpers of the evals tests: answer files and grade rows (the scripted judge: caft.testing.grading)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caft.evals.schema import GradeRow


def write_answers(path: Path, answers: list[tuple[str, str, str]]) -> Path:
    """(id, question_id, answer) rows with a fixed question text per question id."""
    path.write_text(
        "".join(
            json.dumps({"id": i, "question_id": q, "question": f"question {q}?", "answer": a}) + "\n"
            for i, q, a in answers
        ),
        encoding="utf-8",
    )
    return path


def grade_row(**fields: Any) -> GradeRow:
    """A valid grade row for metric and report tests; the judge, prompt hash and rule default to fixed values."""
    base: dict[str, Any] = {"judge": "mock/j", "prompt_hash": "0" * 16, "scoring": "logprob_0_100"}
    return GradeRow.model_validate({**base, **fields})
