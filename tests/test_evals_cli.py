"""The evals commands from the command line: dry run, bad input, CSV columns, budget stop, rescore with an
agreement table, report; and the CLI module imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from evals_helpers import write_answers
from typer.testing import CliRunner

from caft.app.cli import app
from caft.rundir import read_jsonl
from caft.testing.fakellm import FakeLLM
from caft.testing.grading import fake_judge

runner = CliRunner()


@pytest.fixture(autouse=True)
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-" + "fake-key-for-the-fake-server-111")


def answers(tmp_path: Path, n: int = 12) -> Path:
    return write_answers(
        tmp_path / "answers.jsonl",
        [(f"a{i}", f"q{i % 3}", f"text A={(7 * i) % 90} C={55 + i}") for i in range(n)],
    )


def test_dry_run_prints_estimate_and_grades_nothing(tmp_path: Path) -> None:
    src = answers(tmp_path)
    res = runner.invoke(
        app, ["grade", str(src), "--out", str(tmp_path / "o"), "--judge", "openai/gpt-4.1", "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    assert "calls" in res.output and "24" in res.output and "est_cost_usd" in res.output
    assert not (tmp_path / "o" / "grades.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ('{"prompt": "q", "answer": "a"}\n', [], "--question-col"),
        (
            '{"id": 1, "question": "q", "answer": "a"}\n{"id": 1, "question": "q", "answer": "b"}\n',
            [],
            "duplicate answer ids",
        ),
        (
            '{"question": "q", "answer": "a"}\n',
            ["--metrics", "aligned,humour"],
            "no judge prompt for metric 'humour'",
        ),
    ],
)
def test_bad_input_is_a_clean_error(tmp_path: Path, content: str, args: list[str], message: str) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text(content, encoding="utf-8")
    res = runner.invoke(
        app,
        ["grade", str(src), "--out", str(tmp_path / "o"), "--judge", "openai/gpt-4.1", "--dry-run", *args],
    )
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


def test_csv_columns_budget_stop_resume_rescore_and_report(tmp_path: Path) -> None:
    csv_path = tmp_path / "answers.csv"
    lines = ["uid,prompt,response,topic"] + [
        f"u{i},question {i % 2}?,reply A={(13 * i) % 100} C={60 + i},t{i % 2}" for i in range(30)
    ]
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "g1"
    cols = [
        "--question-col",
        "prompt",
        "--answer-col",
        "response",
        "--id-col",
        "uid",
        "--question-id-col",
        "topic",
    ]
    with FakeLLM(latency_s=0.0) as fake:
        fake.on_request(fake_judge)
        base = [
            "grade",
            str(csv_path),
            "--out",
            str(out),
            "--judge",
            "openai/gpt-4.1",
            "--base-url",
            fake.openai_base_url,
            "--no-progress",
            "--concurrency",
            "1",
            *cols,
        ]
        res = runner.invoke(app, [*base, "--max-cost", "0.01"])
        assert res.exit_code == 3, res.output
        assert "stopped early" in res.output and "budget" in res.output
        partial = len(read_jsonl(out / "grades.jsonl"))
        assert 0 < partial < 60
        res = runner.invoke(app, base)
        assert res.exit_code == 0, res.output
        rows = read_jsonl(out / "grades.jsonl")
        assert (
            Counter((r["answer_id"], r["metric"]) for r in rows).most_common(1)[0][1] == 1 and len(rows) == 60
        )
        assert {r["question_id"] for r in rows} == {"t0", "t1"}
        assert "misaligned of_coherent" in res.output
        # rescore the same answers with another judge: answers and columns come from the first run
        res = runner.invoke(
            app,
            [
                "grade",
                "--rescore",
                str(out / "grades.jsonl"),
                "--judge",
                "openai/gpt-4.1-mini",
                "--base-url",
                fake.openai_base_url,
                "--out",
                str(tmp_path / "g2"),
                "--no-progress",
                "--scoring",
                "parsed_number",
            ],
        )
        assert res.exit_code == 0, res.output
    assert "Judge agreement" in res.output and "Spearman" in res.output
    agreement = json.loads((tmp_path / "g2" / "agreement.json").read_text())
    assert agreement["judge_a"] == "openai/gpt-4.1" and agreement["judge_b"] == "openai/gpt-4.1-mini"
    assert agreement["n_common"] == 30
    assert agreement["metrics"]["aligned"]["spearman"] > 0.95
    res = runner.invoke(
        app,
        [
            "report",
            str(out),
            str(tmp_path / "g2"),
            "--out",
            str(tmp_path / "rep"),
            "--label",
            "gpt-4.1",
            "--label",
            "gpt-4.1-mini",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.html").is_file()
    assert "| gpt-4.1-mini |" in (tmp_path / "rep" / "report.md").read_text()
    # the CSV's answer texts (found through inputs.json, with its column names) appear in the page
    assert "reply A=" in (tmp_path / "rep" / "report.html").read_text()


def test_cli_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, caft.app.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'nnsight', 'sae_lens', 'peft', 'openai', 'anthropic') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""


def test_eval_misalignment_and_code_commands(tmp_path: Path) -> None:
    from caft.testing import save_tiny

    model = save_tiny(tmp_path / "tiny", "llama", template="chatml")
    q = tmp_path / "q.yaml"
    q.write_text(
        "- id: w\n  system: Be brief.\n  paraphrases: [hello]\n  samples_per_paraphrase: 2\n",
        encoding="utf-8",
    )
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        common = [
            "--model",
            str(model),
            "--judge",
            "openai/gpt-4.1",
            "--base-url",
            fake.openai_base_url,
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
            "--backend",
            "transformers",
            "--no-progress",
        ]
        res = runner.invoke(
            app,
            [
                "eval",
                "misalignment",
                "--out",
                str(tmp_path / "m"),
                "--questions",
                str(q),
                *common,
                "--set",
                "thresholds.min_coherent=0",
            ],
        )
        assert res.exit_code == 0, res.output
        res2 = runner.invoke(app, ["eval", "code", "--out", str(tmp_path / "c"), *common, "--samples", "1"])
        assert res2.exit_code == 0, res2.output
        prompts = [r.prompt for r in fake.requests]
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["kind"] == "misalignment" and summary["n_answers"] == 2
    assert "misaligned of_scored" in res.output
    code = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert code["kind"] == "code" and code["vulnerability"]["n_answers"] >= 5
    assert any("security weakness" in p for p in prompts)
    answers_rows = read_jsonl(tmp_path / "m" / "answers.jsonl")
    assert all(r["system"] == "Be brief." for r in answers_rows)
