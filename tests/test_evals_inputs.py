"""Answers files: JSONL and CSV, configurable columns, generated ids, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from caft.evals.inputs import Columns, load_answers

from caft.errors import DataError


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_with_ids_and_question_ids(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"id": "x1", "question_id": "q", "question": "hi", "answer": "hello", "model": "m"},
            {"id": "x2", "question_id": "q", "question": "hi", "answer": "hey"},
        ],
    )
    rows = load_answers(f)
    assert [r.id for r in rows] == ["x1", "x2"]
    assert rows[0].question_id == "q" and rows[0].extra == {"model": "m"}
    assert not rows[0].id_generated


def test_generated_ids_are_stable_and_distinct(tmp_path: Path) -> None:
    rows_in = [
        {"question": "hi", "answer": "same"},
        {"question": "hi", "answer": "same"},
        {"question": "hi", "answer": "other"},
    ]
    f = write_jsonl(tmp_path / "a.jsonl", rows_in)
    a = load_answers(f)
    b = load_answers(f)
    assert [r.id for r in a] == [r.id for r in b]
    assert len({r.id for r in a}) == 3
    assert all(r.id_generated for r in a)
    assert a[0].question_id == "hi"


def test_csv_with_custom_columns(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text('prompt,response,uid\n"What, now?","It is ""fine""",u1\nWhy,Because,u2\n', encoding="utf-8")
    rows = load_answers(f, Columns(question="prompt", answer="response", id="uid"))
    assert [(r.id, r.question, r.answer) for r in rows] == [
        ("u1", "What, now?", 'It is "fine"'),
        ("u2", "Why", "Because"),
    ]


def test_missing_column_names_the_fix(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "answer": "x"}])
    with pytest.raises(DataError, match=r"no question column 'question'.*prompt.*--question-col"):
        load_answers(f)
    f = write_jsonl(tmp_path / "b.jsonl", [{"question": "hi", "answer": "x"}, {"question": "ho"}])
    with pytest.raises(DataError, match=r"b.jsonl:2: this row has no answer field"):
        load_answers(f)


def test_duplicate_ids_are_an_error(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"id": 1, "question": "q", "answer": "a"},
            {"id": 2, "question": "q", "answer": "b"},
            {"id": 1, "question": "q", "answer": "c"},
        ],
    )
    with pytest.raises(DataError, match=r"duplicate answer ids: '1' \(lines 1 and 3\)"):
        load_answers(f)


def test_empty_answers_are_kept(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"question": "q", "answer": ""},
            {"question": "q", "answer": None},
            {"question": "q", "answer": "  "},
            {"question": "q", "answer": "ok"},
        ],
    )
    rows = load_answers(f)
    assert len(rows) == 4
    assert [r.empty for r in rows] == [True, True, True, False]


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    good = json.dumps({"id": "g", "question": "q", "answer": "fine"}).encode()
    bad = b'{"id": "b", "question": "q", "answer": "caf\xe9 \xff"}'
    f.write_bytes(good + b"\n" + bad + b"\n")
    rows = load_answers(f)
    assert [r.id for r in rows] == ["g", "b"]
    assert rows[1].replaced_bytes == 2
    assert "\ufffd" in rows[1].answer
    assert rows[1].notes() == {"input_replaced_bytes": 2}
    c = tmp_path / "a.csv"
    c.write_bytes(b"question,answer\nq,\xff\xfe ok\n")
    (row,) = load_answers(c)
    assert row.replaced_bytes >= 1


def test_megabyte_answer_is_truncated_with_a_count(tmp_path: Path) -> None:
    big = "x" * 1_000_000
    f = write_jsonl(
        tmp_path / "a.jsonl",
        [{"id": "big", "question": "q", "answer": big}, {"id": "s", "question": "q", "answer": "s"}],
    )
    rows = load_answers(f, max_answer_chars=1000)
    assert len(rows) == 2
    assert rows[0].truncated_chars == 999_000
    assert rows[0].answer.startswith("x" * 1000)
    assert "999000 characters cut" in rows[0].answer
    assert len(rows[0].answer) < 1100
    assert rows[0].notes() == {"answer_truncated_chars": 999_000}
    assert rows[1].truncated_chars == 0


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_answers(tmp_path / "none.jsonl")
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"\.jsonl or \.csv"):
        load_answers(tmp_path / "a.txt")
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_answers(tmp_path / "e.jsonl")
    (tmp_path / "m.jsonl").write_text(
        '{"question": "q", "answer": "a"}\n{oops\n{"question": "q", "answer": "b"}\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"m.jsonl:2: not valid JSON"):
        load_answers(tmp_path / "m.jsonl")
    (tmp_path / "l.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match="JSON object"):
        load_answers(tmp_path / "l.jsonl")
