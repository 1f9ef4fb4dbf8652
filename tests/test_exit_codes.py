"""Exit codes: an incomplete grading (too many failed judge calls) exits 3, distinct from configuration errors
(2), through `caft grade` and through `caft run`, whose eval stage is then not marked done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from evals_helpers import write_answers
from typer.testing import CliRunner

from caft.app.cli import app
from caft.errors import EXIT_ERROR, EXIT_INCOMPLETE, ConfigError, IncompleteError
from caft.evals.pipeline import GradingIncompleteError
from caft.testing import save_tiny
from caft.testing.fakellm import FakeLLM, Fault
from caft.testing.grading import fake_judge


@pytest.fixture(autouse=True)
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-" + "fake-key-for-the-fake-server-444")


def test_the_codes() -> None:
    assert (EXIT_ERROR, EXIT_INCOMPLETE) == (2, 3)
    assert ConfigError("x").exit_code == 2
    assert issubclass(GradingIncompleteError, IncompleteError)
    assert GradingIncompleteError("x", []).exit_code == 3


def test_caft_grade_all_500_exits_3_and_a_config_error_exits_2(tmp_path: Path) -> None:
    src = write_answers(tmp_path / "a.jsonl", [(f"a{i}", "q0", f"reply {i} A=80 C=90") for i in range(3)])
    runner = CliRunner()
    with FakeLLM() as fake:
        fake.on_request(lambda req: Fault("500"))
        args = ["grade", str(src), "--out", str(tmp_path / "g"), "--judge", "openai/gpt-4.1",
                "--base-url", fake.openai_base_url, "--no-progress", "--set", "judge.max_retries=0"]  # fmt: skip
        res = runner.invoke(app, args)
        assert res.exit_code == 3, res.output
        assert res.output.startswith("incomplete:") and "rerun the same command" in res.output
        fake.on_request(fake_judge)
        assert runner.invoke(app, args).exit_code == 0  # the judge is back: the rerun regrades and passes
    res = runner.invoke(app, ["grade", str(src), "--out", str(tmp_path / "h"), "--judge", "foo/bar"])
    assert res.exit_code == 2 and res.output.startswith("error:"), res.output


QUESTIONS = "- id: w\n  paraphrases: [Say hello.]\n  samples_per_paraphrase: 2\n"


def test_caft_run_eval_stage_with_a_failing_judge_exits_3_and_stays_undone(tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "tiny", "llama", template="chatml")
    (tmp_path / "q.yaml").write_text(QUESTIONS)
    run = tmp_path / "run"
    with FakeLLM() as fake:
        judge = {"model": "openai-compatible/j", "base_url": fake.openai_base_url, "max_retries": 0}
        cfg = {
            "out_dir": str(run),
            "model": {"name_or_path": str(model), "device": "cpu"},
            "finetuned": {"name_or_path": str(model), "device": "cpu"},
            "eval_models": ["ft"],
            "triage": {"kind": "offline-embedding"},
            "eval": {
                "questions": str(tmp_path / "q.yaml"),
                "sample": {"max_new_tokens": 3, "backend": "transformers"},
                "grade": {"judge": judge},
            },
        }
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        fake.on_request(lambda req: Fault("500"))
        res = CliRunner().invoke(app, ["run", str(path), "--only", "eval"])
        assert res.exit_code == 3, res.output
        assert "4 of 4 judge calls ended as provider errors" in res.output and "rerun" in res.output
        assert not (run / "eval" / "DONE.json").exists()
        summary = json.loads((run / "eval" / "ft" / "misalignment" / "summary.json").read_text())
        assert summary["unscored_grades"] == {"provider_error": 4}
        fake.on_request(fake_judge)
        res = CliRunner().invoke(app, ["run", str(path), "--only", "eval"])
    assert res.exit_code == 0, res.output
    assert (run / "eval" / "DONE.json").is_file()
    summary = json.loads((run / "eval" / "ft" / "misalignment" / "summary.json").read_text())
    assert summary["unscored_grades"] == {}
