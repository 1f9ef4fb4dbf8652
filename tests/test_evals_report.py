"""Summaries from grades and the markdown + self-contained HTML report."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from evals_helpers import grade_row

from caft.errors import DataError
from caft.evals.config import ThresholdsConfig
from caft.evals.report import load_run, write_report
from caft.evals.summary import summarize_grades
from caft.rundir import JsonlWriter

EVIL = '<script>alert("x")</script>'


def make_run(root: Path, name: str, mis_every: int, qids: tuple[str, ...] = ("q_a", EVIL)) -> Path:
    d = root / name
    with JsonlWriter(d / "grades.jsonl") as w:
        for qi, q in enumerate(qids):
            for i in range(20):
                aid = f"{qi}-{i}"
                aligned = 10.0 if i % mis_every == 0 else 90.0
                coherent = 80.0 if i % 7 else 20.0
                w.write(grade_row(answer_id=aid, question_id=q, metric="aligned", score=aligned).to_json())
                w.write(grade_row(answer_id=aid, question_id=q, metric="coherent", score=coherent).to_json())
            r_id = f"{qi}-r"
            w.write(
                grade_row(
                    answer_id=r_id, question_id=q, metric="aligned", score=None, unscored_reason="refusal"
                ).to_json()
            )
            w.write(grade_row(answer_id=r_id, question_id=q, metric="coherent", score=90.0).to_json())
    with JsonlWriter(d / "answers.jsonl") as w:
        for qi, q in enumerate(qids):
            for i in range(20):
                w.write(
                    {
                        "id": f"{qi}-{i}",
                        "question_id": q,
                        "question": f"ask {q}",
                        "answer": f"answer {i} {EVIL}",
                    }
                )
    summarize_grades(d / "grades.jsonl", kind="misalignment", thresholds=ThresholdsConfig(), n_resamples=200)
    return d


def test_summary_numbers(tmp_path: Path) -> None:
    d = make_run(tmp_path, "ft", mis_every=4)
    s = json.loads((d / "summary.json").read_text())
    ov = s["misalignment"]["overall"]
    # per question: i in 0..19; incoherent when i % 7 == 0 (0, 7, 14); misaligned when i % 4 == 0 and coherent
    # misaligned i: 4, 8, 12, 16 -> 4 per question; coherent 17 per question; scored 20, unscored 1
    assert ov["n_misaligned"] == 8 and ov["n_coherent"] == 34 and ov["n_scored"] == 40
    assert ov["of_coherent"]["rate"] == pytest.approx(8 / 34)
    assert ov["of_scored"]["rate"] == pytest.approx(8 / 40)
    assert ov["n_unscored"] == 2 and ov["unscored_reasons"] == {"refusal": 2}
    assert s["judge"] == "mock/j"


def test_report_markdown_and_html(tmp_path: Path) -> None:
    base = make_run(tmp_path, "base", mis_every=50)
    ft = make_run(tmp_path, "finetuned", mis_every=4)
    (ft / "code").mkdir()
    (ft / "code" / "summary.json").write_text(
        json.dumps(
            {
                "kind": "code",
                "judge": "mock/j",
                "vulnerability": {
                    "rate": {"k": 9, "n": 10, "rate": 0.9, "ci_low": 0.7, "ci_high": 1.0},
                    "n_unscored": 1,
                },
            }
        )
    )
    (base / "mc").mkdir()
    (base / "mc" / "summary.json").write_text(
        json.dumps(
            {
                "kind": "mc",
                "mc": {
                    "id": {"k": 9, "n": 10, "rate": 0.9, "ci_low": 0.7, "ci_high": 1.0},
                    "ood": {"k": 3, "n": 10, "rate": 0.3, "ci_low": 0.1, "ci_high": 0.6},
                },
            }
        )
    )
    md_path, html_path = write_report([base, ft], tmp_path / "report", labels=["base", f"ft {EVIL}"])
    md = md_path.read_text()
    assert "| base |" in md and "misaligned / coherent" in md
    assert "23.53%" in md  # 8/34 for the fine-tuned run
    assert "90.00% [70.0%, 100.0%] (9/10)" in md
    assert "30.00%" in md  # the MC OOD accuracy of base
    page = html_path.read_text()
    assert EVIL not in page
    assert "&lt;script&gt;" in page
    assert "<script" not in page.lower()
    assert page.count("<svg") >= 4  # bars, two scatter panels, trade-off
    # self-contained: no external references other than the SVG namespace
    urls = set(re.findall(r"(?:src|href)=\"([^\"]+)\"", page))
    assert not urls
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "Coherent answers with the lowest aligned scores" in page and "answer 4 &lt;script&gt;" in page
    run = load_run(ft)
    assert len(run.examples) == 5
    assert all(e["aligned"] == 10.0 and e["coherent"] > 50 for e in run.examples)
    assert run.vulnerability is not None and len(run.scatter) == 40  # the refusals have no aligned score


def test_report_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"summary\.json"):
        load_run(tmp_path)
    with pytest.raises(DataError, match="at least one"):
        write_report([], tmp_path / "r")
    d = make_run(tmp_path, "x", 3)
    with pytest.raises(DataError, match="labels"):
        write_report([d], tmp_path / "r", labels=["a", "b"])


def test_duplicate_labels_stay_distinct(tmp_path: Path) -> None:
    a = make_run(tmp_path / "one", "run", 3)
    b = make_run(tmp_path / "two", "run", 5)
    md, _ = write_report([a, b], tmp_path / "r")
    text: Any = md.read_text()
    assert "| run |" in text and "| run (2) |" in text
