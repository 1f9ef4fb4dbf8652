"""The golden judged-answer set (tests/fixtures/judged_answers.jsonl), folded into `AnswerRecord`s.

Two models (base, ft) x 3 questions x 5 samples graded by judge-a; the ft answers graded again by judge-b.
Scores are logprob-style (weighted means, not integers); unscored rows carry the grader's reasons.
"""

from __future__ import annotations

import json
from pathlib import Path

from caft.evals.stats import AnswerRecord, answer_record

GOLDEN = Path(__file__).parent / "fixtures" / "judged_answers.jsonl"


def load_golden() -> dict[tuple[str, str], list[AnswerRecord]]:
    """{(judge, model): records}, one record per answer, in file order."""
    scores: dict[tuple[str, str, str], dict[str, float | None]] = {}
    reasons: dict[tuple[str, str, str], dict[str, str]] = {}
    question: dict[str, str] = {}
    for line in GOLDEN.read_text().splitlines():
        row = json.loads(line)
        key = (row["judge"], row["model"], row["answer_id"])
        question[row["answer_id"]] = row["question_id"]
        scores.setdefault(key, {})[row["metric"]] = row["score"]
        if row["score"] is None:
            reasons.setdefault(key, {})[row["metric"]] = row["unscored_reason"]
    out: dict[tuple[str, str], list[AnswerRecord]] = {}
    for (judge, model, aid), s in scores.items():
        rec = answer_record(aid, question[aid], s, reasons.get((judge, model, aid)), model=model)
        out.setdefault((judge, model), []).append(rec)
    return out
