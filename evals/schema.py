"""The grade row: one line of `grades.jsonl` per (answer, metric), written and read only through `GradeRow`.

A row is either scored (`score` in [0, 100], `unscored_reason` null) or unscored (`score` null and a reason
from `UNSCORED_REASONS`). It names the judge, the hash of the judge prompt and the scoring rule, so grades
made under different settings are never mixed silently, and it keeps what the judge said: the top
logprobs (logprob rule) or the reply texts (text rules), scrubbed of secrets before they are stored.

`read_grades` is the one reader: every row is validated, and a bad row is a `DataError` naming the file and
the line. A torn last line (a kill mid-write) is skipped, as `caft.rundir.iter_jsonl` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from caft.errors import DataError
from caft.evals.scoring import ScoringRule, UnscoredReason
from caft.rundir import iter_jsonl


class GradeRow(BaseModel):
    """One judge verdict on one (answer, metric) pair."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    answer_id: str
    question_id: str
    metric: str
    judge: str
    """The judge model, `<provider>/<model>`."""
    prompt_hash: str
    """`caft.evals.questions.prompt_hash` of the judge prompt template."""
    scoring: ScoringRule
    score: float | None = Field(default=None, ge=0.0, le=100.0)
    unscored_reason: UnscoredReason | None = None
    numeric_mass: float | None = Field(default=None, ge=0.0)
    """Logprob rule: the probability held by the integer tokens 0..100."""
    reply: str | None = None
    """Logprob rule: the judge's one reply token."""
    top_logprobs: list[tuple[str, float]] | None = None
    """Logprob rule: the alternatives at the reply position, as returned."""
    replies: list[str] | None = None
    """Text rules: every sampled reply."""
    parsed: list[float | None] | None = None
    """Text rules: the number parsed from each reply, or null."""
    error: str | None = None
    """Why the judge call failed (`provider_error`) or returned nothing usable."""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0
    """Dollars for the judge calls of this row (null when the model has no price)."""
    cached: bool = False
    answer_truncated_chars: int | None = None
    """Characters cut from an over-long answer before judging."""
    input_replaced_bytes: int | None = None
    """Undecodable bytes of the input line replaced by U+FFFD."""

    @model_validator(mode="after")
    def _score_or_reason(self) -> GradeRow:
        if self.score is None and self.unscored_reason is None:
            raise ValueError("an unscored row needs an unscored_reason")
        if self.score is not None and self.unscored_reason is not None:
            raise ValueError(f"a scored row cannot have unscored_reason {self.unscored_reason!r}")
        return self

    @property
    def key(self) -> tuple[str, str]:
        return (self.answer_id, self.metric)

    @property
    def scored(self) -> bool:
        return self.score is not None

    def to_json(self) -> dict[str, Any]:
        """The row as written: fields that are unset (None) are left out, except `score`."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["score"] = self.score
        return data


def iter_grades(path: str | Path, allow_torn_tail: bool = True) -> Iterator[GradeRow]:
    """Validated rows of a grades file, in file order (later rows for a pair win in every consumer)."""
    p = Path(path)
    for n, raw in enumerate(iter_jsonl(p, allow_torn_tail=allow_torn_tail), start=1):
        try:
            yield GradeRow.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "row"
            raise DataError(
                f"{p}: grade record {n} is not a valid grade ({where}: {first['msg']}); the file was "
                "written by another tool or edited by hand: regrade into a new --out folder"
            ) from None


def read_grades(path: str | Path, allow_torn_tail: bool = True) -> list[GradeRow]:
    """Every row of a grades file, validated (see `iter_grades`)."""
    return list(iter_grades(path, allow_torn_tail))
