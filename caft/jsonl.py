"""The one JSONL reader every command uses: the data a user gives (training rows, diff inputs, corpora,
answers, prompts) and caft's own record files (candidates, verdicts, grades).

    for row in iter_rows(path, skip_invalid=True, report=rep):   # row.line, row.data
        ...
    rep.write_skipped(stage_dir / SKIPPED_FILE)                    # what was skipped, line by line

A line that is not UTF-8, not JSON, or not a JSON object is a `DataError` naming the file and the line, or,
with `skip_invalid`, is left out and recorded in the `ReadReport` (row parsers add their own rejections to
the same report). A torn final line (no newline: a crash mid-write) is dropped when `allow_torn_tail`.
`bad_bytes="replace"` decodes undecodable bytes as U+FFFD instead and counts them on the row (answers to
grade: one odd byte in a model's answer should not stop a grading run).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from caft.errors import DataError

BadBytes = Literal["error", "replace"]
SKIPPED_FILE = "skipped.jsonl"
SKIP_HINT = "pass --skip-invalid to skip bad rows and count them"


@dataclass
class ReadReport:
    """What a reader saw: rows read, rows kept, and each skipped row with its line and reason."""

    path: str = ""
    rows: int = 0
    kept: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def skip(self, line: int, reason: str) -> None:
        self.skipped.append((line, reason))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows": self.rows,
            "kept": self.kept,
            "skipped": len(self.skipped),
            "skipped_lines": [{"line": n, "reason": r} for n, r in self.skipped[:100]],
        }

    def write_skipped(self, path: str | Path, append: bool = False) -> None:
        """One `{"file", "line", "reason"}` record per skipped row (nothing written when none was)."""
        if not self.skipped:
            return
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a" if append else "w", encoding="utf-8") as f:
            for line, reason in self.skipped:
                f.write(json.dumps({"file": self.path, "line": line, "reason": reason}, ensure_ascii=False))
                f.write("\n")


@dataclass(frozen=True)
class JsonlRow:
    line: int
    """1-based line number in the file."""
    data: dict[str, Any]
    replaced_bytes: int = 0
    """Undecodable bytes replaced by U+FFFD (`bad_bytes="replace"` only)."""


def _decode(raw: bytes, bad_bytes: BadBytes) -> tuple[str, int]:
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        if bad_bytes == "error":
            raise
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")


def _problem(raw: bytes, bad_bytes: BadBytes) -> tuple[dict[str, Any] | None, int, str]:
    """(object, replaced bytes, "") or (None, 0, why the line is unusable)."""
    try:
        text, replaced = _decode(raw, bad_bytes)
    except UnicodeDecodeError as e:
        return None, 0, f"not UTF-8 text ({e.reason} at byte {e.start} of the line)"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, 0, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, 0, f"expected a JSON object, got {type(obj).__name__}"
    return obj, replaced, ""


def iter_rows(
    path: str | Path,
    *,
    skip_invalid: bool = False,
    report: ReadReport | None = None,
    allow_torn_tail: bool = True,
    bad_bytes: BadBytes = "error",
    hint: str | None = None,
) -> Iterator[JsonlRow]:
    """The objects of a JSONL file with their line numbers. Errors name `path:line`; `hint` (e.g.
    `SKIP_HINT`) is appended to them when `skip_invalid` is off."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a folder; give a JSONL file")
    if not p.exists():
        raise DataError(f"file not found: {p}")
    rep = report if report is not None else ReadReport()
    rep.path = str(p)
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            rep.rows += 1
            obj, replaced, why = _problem(raw, bad_bytes)
            if obj is None:
                if allow_torn_tail and not raw.endswith(b"\n") and not why.startswith("expected"):
                    rep.rows -= 1
                    return
                if not skip_invalid:
                    suffix = f" ({hint})" if hint else ""
                    raise DataError(f"{p}:{lineno}: {why}{suffix}")
                rep.skip(lineno, why)
                continue
            rep.kept += 1
            yield JsonlRow(lineno, obj, replaced)


def iter_jsonl(
    path: str | Path,
    allow_torn_tail: bool = True,
    *,
    skip_invalid: bool = False,
    report: ReadReport | None = None,
    hint: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The objects of a JSONL file (see `iter_rows`)."""
    for row in iter_rows(
        path, skip_invalid=skip_invalid, report=report, allow_torn_tail=allow_torn_tail, hint=hint
    ):
        yield row.data


def read_jsonl(
    path: str | Path,
    allow_torn_tail: bool = True,
    *,
    skip_invalid: bool = False,
    report: ReadReport | None = None,
) -> list[dict[str, Any]]:
    """Every object of a JSONL file (see `iter_rows`)."""
    return list(iter_jsonl(path, allow_torn_tail, skip_invalid=skip_invalid, report=report))
