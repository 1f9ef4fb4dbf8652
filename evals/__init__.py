"""caft.evals: misalignment evaluation, a crash-safe batch grader, task metrics, and reports.

Public API (imported on first use, so `import caft.evals` stays light for the CLI)::

    from caft.evals import load_questions, load_judge_prompts, render_judge_prompt     # EM YAML format
    from caft.evals import aggregate_logprobs, score_replies                            # the 0-100 rules
    from caft.evals import load_answers, grade, GradeRow, read_grades, PromptBook       # batch grading
    from caft.evals import misalignment, collect_scores, bootstrap_ci, mc_accuracy      # metrics
    from caft.evals import run_misalignment_eval, run_code_eval, run_eval_stage, run_mc_eval, grade_file
    from caft.evals import write_report, compare                                        # reports, judge agreement
    from caft.evals import misalignment_stats, misalign_at_k, compare_models            # clustered statistics
    from caft.evals import judge_agreement, rescore_agreement                           # alpha, kappa, consensus

CLI: `caft grade`, `caft eval misalignment|code|mc`, `caft report`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Question": "questions",
    "load_questions": "questions",
    "load_judge_prompts": "questions",
    "render_judge_prompt": "questions",
    "prompt_hash": "questions",
    "aggregate_logprobs": "scoring",
    "score_replies": "scoring",
    "parse_number": "scoring",
    "AnswerRow": "inputs",
    "Columns": "inputs",
    "load_answers": "inputs",
    "GradeRow": "schema",
    "read_grades": "schema",
    "GradeReport": "grader",
    "PromptBook": "prompt_book",
    "grade": "grader",
    "grade_async": "grader",
    "estimate": "grader",
    "resolve_scoring_rule": "grader",
    "estimate_grading": "pipeline",
    "GradingIncompleteError": "pipeline",
    "bootstrap_ci": "metrics",
    "collect_scores": "metrics",
    "misalignment": "metrics",
    "score_rate": "metrics",
    "mc_accuracy": "metrics",
    "summarize_grades": "summary",
    "answer_records": "summary",
    "AnswerRecord": "stats",
    "answer_record": "stats",
    "misalignment_stats": "stats",
    "stats_by_model": "stats",
    "misalign_at_k": "stats",
    "binary_rate": "stats",
    "compare_models": "paired",
    "PairedComparison": "paired",
    "judge_agreement": "agreement_stats",
    "disagreements_markdown": "agreement_stats",
    "krippendorff_alpha_interval": "agreement_stats",
    "cohen_kappa": "agreement_stats",
    "fleiss_kappa": "agreement_stats",
    "rescore_agreement": "agreement",
    "grade_file": "pipeline",
    "run_misalignment_eval": "pipeline",
    "run_code_eval": "pipeline",
    "run_eval_stage": "pipeline",
    "run_mc_eval": "mc",
    "sample_answers": "sampling",
    "write_report": "report",
    "compare": "agreement",
    "EvalConfig": "config",
    "GradeConfig": "config",
    "MisalignmentEvalConfig": "config",
    "SampleConfig": "config",
    "ThresholdsConfig": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'caft.evals' has no attribute {name!r}")
    return getattr(importlib.import_module(f"caft.evals.{module}"), name)
