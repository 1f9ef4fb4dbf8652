"""Reading answers to grade from any JSONL or CSV file with a question column and an answer column.

Problems in the input are either a clear `DataError` (missing columns, duplicate ids, a file that is not
JSONL/CSV) or handled and recorded on the row (undecodable bytes replaced and counted, an over-long answer
truncated with the number of characters cut, an empty answer kept and later recorded as unscored). No row is
dropped silently: every input row becomes exactly one `AnswerRow`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caft.errors import DataError
from caft.jsonl import SKIP_HINT, ReadReport, iter_rows

log = logging.getLogger(__name__)

DEFAULT_MAX_ANSWER_CHARS = 32_000
TRUNCATION_NOTE = "\n[... {n} characters cut by caft before judging ...]"


@dataclass(frozen=True)
class Columns:
    """Which input columns hold what. `id` and `question_id` are optional in the data."""

    question: str = "question"
    answer: str = "answer"
    id: str = "id"
    question_id: str = "question_id"


@dataclass
class AnswerRow:
    id: str
    question_id: str
    question: str
    answer: str
    line: int
    """1-based line (JSONL) or record number (CSV) in the input, for messages."""
    truncated_chars: int = 0
    """Characters cut from the end of an over-long answer before judging."""
    replaced_bytes: int = 0
    """Undecodable bytes in the input line replaced by U+FFFD."""
    id_generated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.answer.strip()

    def notes(self) -> dict[str, Any]:
        """Input handling worth recording next to each grade."""
        out: dict[str, Any] = {}
        if self.truncated_chars:
            out["answer_truncated_chars"] = self.truncated_chars
        if self.replaced_bytes:
            out["input_replaced_bytes"] = self.replaced_bytes
        return out


def _decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of undecodable bytes replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")


def _iter_jsonl_records(
    path: Path, skip_invalid: bool = False, report: ReadReport | None = None
) -> list[tuple[int, dict[str, Any], int]]:
    rows = iter_rows(
        path,
        skip_invalid=skip_invalid,
        report=report,
        allow_torn_tail=False,
        bad_bytes="replace",
        hint=SKIP_HINT,
    )
    return [(r.line, r.data, r.replaced_bytes) for r in rows]


def _iter_csv_records(path: Path) -> list[tuple[int, dict[str, Any], int]]:
    text, replaced_total = _decode(path.read_bytes())
    if replaced_total:
        log.warning("%s: %d undecodable bytes replaced by U+FFFD", path, replaced_total)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    out: list[tuple[int, dict[str, Any], int]] = []
    for i, rec in enumerate(reader, start=1):
        if None in rec:
            raise DataError(
                f"{path}: record {i} has more fields than the header; quote fields that contain commas"
            )
        replaced = sum(str(v).count("\ufffd") for v in rec.values() if v is not None)
        out.append((i, dict(rec), replaced))
    return out


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _question_key(question: str) -> str:
    """A readable question id for inputs without one: the text itself when short, else a prefix + hash."""
    flat = " ".join(question.split())
    if len(flat) <= 60:
        return flat
    return flat[:48] + "..." + hashlib.sha1(question.encode("utf-8")).hexdigest()[:8]


def load_answers(
    path: str | Path,
    columns: Columns | None = None,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    skip_invalid: bool = False,
    report: ReadReport | None = None,
) -> list[AnswerRow]:
    """Read answers from JSONL (`.jsonl`, `.json`, `.ndjson`) or CSV (`.csv`, `.tsv` not supported).

    Ids come from the `id` column; rows without one get a stable id from a hash of (question, answer,
    occurrence), so a rerun on the same file resumes the same rows.
    """
    cols = columns or Columns()
    p = Path(path)
    if not p.is_file():
        raise DataError(f"answers file not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        records = _iter_jsonl_records(p, skip_invalid, report)
    elif suffix == ".csv":
        records = _iter_csv_records(p)
    else:
        raise DataError(f"{p}: unsupported answers file type {suffix!r}; give a .jsonl or .csv file")
    if not records:
        raise DataError(f"{p}: no answers found (the file is empty)")

    present: set[str] = set()
    for _, rec, _ in records:
        present.update(rec)
    for role, name, flag in (
        ("question", cols.question, "--question-col"),
        ("answer", cols.answer, "--answer-col"),
    ):
        if name not in present:
            shown = ", ".join(sorted(present)[:20])
            raise DataError(
                f"{p}: no {role} column {name!r} (columns found: {shown}); name the right one with {flag}"
            )

    rows: list[AnswerRow] = []
    occurrences: Counter[str] = Counter()
    for line, rec, replaced in records:
        for role, name in (("question", cols.question), ("answer", cols.answer)):
            if name not in rec:
                raise DataError(f"{p}:{line}: this row has no {role} field {name!r}")
        question = _text(rec[cols.question])
        answer = _text(rec[cols.answer])
        cut = 0
        if len(answer) > max_answer_chars:
            cut = len(answer) - max_answer_chars
            answer = answer[:max_answer_chars] + TRUNCATION_NOTE.format(n=cut)
        rid = rec.get(cols.id)
        generated = rid is None or _text(rid).strip() == ""
        if generated:
            digest = hashlib.sha1(f"{question}\0{_text(rec[cols.answer])}".encode()).hexdigest()[:12]
            n = occurrences[digest]
            occurrences[digest] += 1
            rid = f"a-{digest}" + (f"-{n}" if n else "")
        qid = rec.get(cols.question_id)
        extra = {
            k: v for k, v in rec.items() if k not in (cols.question, cols.answer, cols.id, cols.question_id)
        }
        rows.append(
            AnswerRow(
                id=_text(rid),
                question_id=_text(qid) if qid not in (None, "") else _question_key(question),
                question=question,
                answer=answer,
                line=line,
                truncated_chars=cut,
                replaced_bytes=replaced,
                id_generated=generated,
                extra=extra,
            )
        )
    _check_unique(rows, p)
    _log_handling(rows, p)
    return rows


def _check_unique(rows: list[AnswerRow], path: Path) -> None:
    first: dict[str, int] = {}
    dups: list[str] = []
    for r in rows:
        if r.id in first:
            dups.append(f"{r.id!r} (lines {first[r.id]} and {r.line})")
        else:
            first[r.id] = r.line
    if dups:
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise DataError(
            f"{path}: duplicate answer ids: {', '.join(dups[:5])}{more}. Grades are keyed by answer id, so "
            "each must be unique: fix the ids, or drop the id column to have caft generate them"
        )


def _log_handling(rows: list[AnswerRow], path: Path) -> None:
    cut = [r for r in rows if r.truncated_chars]
    bad = [r for r in rows if r.replaced_bytes]
    empty = [r for r in rows if r.empty]
    if cut:
        log.warning(
            "%s: %d answers truncated for judging (recorded per grade as answer_truncated_chars)",
            path,
            len(cut),
        )
    if bad:
        log.warning(
            "%s: %d rows had undecodable bytes (replaced; recorded as input_replaced_bytes)", path, len(bad)
        )
    if empty:
        log.warning("%s: %d empty answers (recorded as unscored: empty_answer)", path, len(empty))


def rows_by_id(rows: list[AnswerRow]) -> Mapping[str, AnswerRow]:
    return {r.id: r for r in rows}
