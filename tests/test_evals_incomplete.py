"""Honest counts: a grading where too many judge calls fail raises `GradingIncompleteError` after writing every
row and the summary, and `summary.json` counts unscored rows by reason even when every question is left out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from evals_helpers import write_answers

from caft.config import ModelConfig
from caft.evals.config import EvalConfig, GradeConfig
from caft.evals.pipeline import GradingIncompleteError, grade_file, run_eval_stage
from caft.llm import LLMClient, MockProvider
from caft.llm.types import GenerateConfig, Message, RetryableError
from caft.rundir import read_jsonl
from caft.testing.fakellm import FakeLLM, Fault
from caft.testing.grading import fake_judge


@pytest.fixture(autouse=True)
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-" + "fake-key-for-the-fake-server-222")


def answers(path: Path, n: int) -> Path:
    return write_answers(
        path, [(f"a{i}", f"q{i % 5}", f"reply {i} A={i % 90} C={60 + i % 40}") for i in range(n)]
    )


def config(url: str, **kw: Any) -> GradeConfig:
    judge = {"model": "openai/gpt-4.1", "base_url": url, "max_retries": 0, "max_concurrency": 4}
    return GradeConfig.model_validate({"judge": judge, **kw})


def test_all_500_judge_fails_the_grading_with_counts_written(tmp_path: Path) -> None:
    src = answers(tmp_path / "a.jsonl", 10)
    out = tmp_path / "g"
    with FakeLLM() as fake:
        fake.on_request(lambda req: Fault("500"))
        with pytest.raises(GradingIncompleteError) as info:
            grade_file(src, out, config(fake.openai_base_url), progress=False)
    message = str(info.value)
    assert "20 of 20 judge calls ended as provider errors" in message
    assert "rerun the same command" in message and "graded again" in message
    rows = read_jsonl(out / "grades.jsonl")
    assert len(rows) == 20 and {r["unscored_reason"] for r in rows} == {"provider_error"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unscored_grades"] == {"provider_error": 20} and summary["n_unscored_grades"] == 20
    # every question has < 5 coherent answers, so the overall rate leaves them all out; the counts stay
    mis = summary["misalignment"]
    assert len(mis["dropped_questions"]) == 5 and mis["overall"]["n_answers"] == 0
    assert mis["all_questions"]["n_unscored"] == 10
    assert mis["all_questions"]["unscored_reasons"] == {"provider_error": 10}
    assert (out / "summary.md").is_file()


def test_one_failure_in_fifty_passes_and_a_rerun_regrades_it(tmp_path: Path) -> None:
    src = answers(tmp_path / "a.jsonl", 25)
    out = tmp_path / "g"
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        fake.inject("500", times=1)
        report, summary = grade_file(src, out, config(fake.openai_base_url), progress=False)
        assert report.unscored == {"provider_error": 1}
        assert summary["unscored_grades"] == {"provider_error": 1} and summary["n_judged_grades"] == 50
        _, again = grade_file(src, out, config(fake.openai_base_url), progress=False)
    assert again["unscored_grades"] == {} and again["n_unscored_grades"] == 0


def test_threshold_is_configurable(tmp_path: Path) -> None:
    src = answers(tmp_path / "a.jsonl", 10)
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        fake.inject("500", times=2)  # 2 of 20 = 10%
        with pytest.raises(GradingIncompleteError):
            grade_file(src, tmp_path / "strict", config(fake.openai_base_url), progress=False)
        fake.inject("500", times=2)
        lax = config(fake.openai_base_url, max_provider_error_share=0.2)
        report, _ = grade_file(src, tmp_path / "lax", lax, progress=False)
    assert report.unscored == {"provider_error": 2}


def _always_busy(messages: list[Message], config: GenerateConfig) -> Any:
    raise RetryableError("server busy (503)", status=503)


def test_eval_stage_raises_after_writing_its_summary(tmp_path: Path) -> None:
    from caft.testing import save_tiny

    model = save_tiny(tmp_path / "tiny", "llama", template="chatml")
    q = tmp_path / "q.yaml"
    q.write_text("- id: w\n  paraphrases: [hello]\n  samples_per_paraphrase: 2\n", encoding="utf-8")
    cfg = EvalConfig.model_validate(
        {"questions": str(q), "sample": {"max_new_tokens": 3, "backend": "transformers"}}
    )

    def factory(grade_cfg: GradeConfig, out: Path) -> LLMClient:
        return LLMClient(MockProvider("judge", _always_busy), max_retries=0)

    with pytest.raises(GradingIncompleteError) as info:
        run_eval_stage(
            ModelConfig(name_or_path=str(model), device="cpu"), cfg, tmp_path / "e", factory, False
        )
    assert info.value.folders == [tmp_path / "e" / "misalignment"]
    summary = json.loads((tmp_path / "e" / "misalignment" / "summary.json").read_text())
    assert summary["unscored_grades"] == {"provider_error": 4}
