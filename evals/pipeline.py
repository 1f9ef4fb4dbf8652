"""The evals end to end: sample answers, grade them, summarize. One function per `caft eval ...` command.

Output folder (every step resumes from its own file)::

    OUT/manifest.json     resolved config, model and judge ids, git commit, package versions (no secrets)
    OUT/answers.jsonl     sampled answers, one per line (resumable)
    OUT/grades.jsonl      one row per (answer, metric) (resumable, crash-safe)
    OUT/summary.json      the figures `caft report` reads; summary.md for people
    OUT/calls.jsonl ...   the judge client's call log and cache (see caft.llm)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caft.evals.config import EvalConfig, GradeConfig, MisalignmentEvalConfig, SampleConfig, ThresholdsConfig
from caft.evals.grader import GradeReport, GradeSettings, PromptBook, grade, resolve_rule
from caft.evals.inputs import Columns, load_answers
from caft.evals.metrics import Thresholds
from caft.evals.questions import Question, load_judge_prompts, load_questions
from caft.evals.report import load_run, markdown
from caft.evals.sampling import ANSWERS_FILE, ChatGenerator, make_generator, sample_answers
from caft.evals.summary import summarize_grades

from caft.config import ModelConfig
from caft.errors import DataError
from caft.llm import LLMClient
from caft.rundir import RunDir, atomic_write_text, iter_jsonl

log = logging.getLogger(__name__)

GRADES_FILE = "grades.jsonl"


def thresholds_of(cfg: ThresholdsConfig) -> Thresholds:
    return Thresholds(
        aligned_below=cfg.aligned_below,
        coherent_above=cfg.coherent_above,
        vulnerable_above=cfg.vulnerable_above,
        min_coherent=cfg.min_coherent,
    )


def settings_of(cfg: GradeConfig, client: LLMClient, metrics: Sequence[str] | None = None) -> GradeSettings:
    return GradeSettings(
        metrics=tuple(metrics or cfg.metrics),
        rule=resolve_rule(cfg.scoring, client),
        min_mass=cfg.min_numeric_mass,
        top_logprobs=cfg.top_logprobs,
        samples=cfg.samples,
        sample_temperature=cfg.sample_temperature,
        seed=cfg.seed,
        retry_provider_errors=cfg.retry_provider_errors,
        workers=max(cfg.judge.max_concurrency, 1) * 2,
    )


def make_client(cfg: GradeConfig, out: Path) -> LLMClient:
    return LLMClient.from_config(cfg.judge, run_dir=out, stage="grade")


def grade_file(
    answers_path: str | Path,
    out: str | Path,
    cfg: GradeConfig,
    thresholds: ThresholdsConfig | None = None,
    client: LLMClient | None = None,
    per_question_prompts: dict[str, dict[str, str]] | None = None,
    kind: str = "grade",
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> tuple[GradeReport, dict[str, Any]]:
    """Grade an answers file into `out/grades.jsonl` and write `out/summary.json`."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = Columns(cfg.columns.question, cfg.columns.answer, cfg.columns.id, cfg.columns.question_id)
    rows = load_answers(answers_path, cols, cfg.max_answer_chars)
    prompts = PromptBook(load_judge_prompts(cfg.judge_prompts), per_question_prompts)
    client = client or make_client(cfg, out_dir)
    settings = settings_of(cfg, client)
    atomic_write_text(
        out_dir / "inputs.json",
        json.dumps(
            {"answers": str(Path(answers_path).resolve()), "columns": cfg.columns.model_dump()}, indent=2
        )
        + "\n",
    )
    report = grade(rows, prompts, client, out_dir / GRADES_FILE, settings, client.model_id, progress)
    th = thresholds or ThresholdsConfig()
    summary = summarize_grades(
        out_dir / GRADES_FILE,
        kind=kind,
        thresholds=thresholds_of(th),
        n_resamples=th.bootstrap_resamples,
        seed=th.bootstrap_seed,
        extra={"grade_run": report.as_dict(), **(extra or {})},
    )
    atomic_write_text(out_dir / "summary.md", markdown([load_run(out_dir, out_dir.name)]))
    return report, summary


def _sample(
    model_cfg: ModelConfig,
    questions: list[Question],
    out: Path,
    sample: SampleConfig,
    generator: ChatGenerator | None,
) -> None:
    gen = generator or make_generator(model_cfg, sample)
    model_id = model_cfg.name_or_path + (f" + {model_cfg.adapter}" if model_cfg.adapter else "")
    rep = sample_answers(gen, questions, out / ANSWERS_FILE, sample, model_id=model_id)
    log.info(
        "answers: %d planned, %d already there, %d generated", rep.planned, rep.already_done, rep.generated
    )


def run_misalignment_eval(
    cfg: MisalignmentEvalConfig,
    out: str | Path,
    client: LLMClient | None = None,
    generator: ChatGenerator | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`caft eval misalignment`: sample answers (system prompts honoured), grade aligned + coherent, summarize."""
    out_dir = Path(out)
    questions = load_questions(cfg.questions)
    RunDir.create(
        out_dir,
        config=cfg,
        models={
            "model": cfg.model.name_or_path,
            **({"adapter": cfg.model.adapter} if cfg.model.adapter else {}),
        },
        judges={"grade": cfg.grade.judge.model},
    )
    _sample(cfg.model, questions, out_dir, cfg.sample, generator)
    missing = [m for m in ("aligned", "coherent") if m not in cfg.grade.metrics]
    if missing:
        raise DataError(
            f"the misalignment eval needs the metrics aligned and coherent; add {', '.join(missing)}"
        )
    per_q = {q.id: dict(q.judge_prompts) for q in questions if q.judge_prompts}
    asked = sorted({q.judge for q in questions if q.judge})
    if (
        asked
        and cfg.grade.judge.model not in asked
        and not any(cfg.grade.judge.model.endswith("/" + a) for a in asked)
    ):
        log.warning(
            "the question file names judge %s; grading with %s (recorded in summary.json)",
            asked,
            cfg.grade.judge.model,
        )
    _, summary = grade_file(
        out_dir / ANSWERS_FILE,
        out_dir,
        cfg.grade,
        cfg.thresholds,
        client,
        per_q,
        kind="misalignment",
        progress=progress,
        extra={
            "model": cfg.model.name_or_path,
            "adapter": cfg.model.adapter,
            "questions": cfg.questions or "caft default",
            "question_file_judges": asked,
        },
    )
    return summary


def load_code_prompts(path: str | Path | None) -> list[Question]:
    """Coding prompts for `caft eval code`: a JSONL or YAML list of {id, prompt} (caft's own few when None)."""
    from caft.evals.questions import default_coding_prompts_path, read_yaml_any

    p = Path(path) if path is not None else default_coding_prompts_path()
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        entries: Any = list(iter_jsonl(p))
    else:
        entries = read_yaml_any(p)
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{p}: expected a list of coding prompts ({{id, prompt}} per entry)")
    out: list[Question] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise DataError(f"{p}: entry {i} must be an object with `prompt` (and optionally `id`)")
        text = e.get("prompt") or e.get("question")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{p}: entry {i} has no `prompt` text")
        qid = str(e.get("id", f"code_{i}"))
        if qid in seen:
            raise DataError(f"{p}: coding prompt id {qid!r} appears twice")
        seen.add(qid)
        system = e.get("system")
        out.append(
            Question(
                id=qid,
                paraphrases=(text,),
                samples_per_paraphrase=1,
                system=system if isinstance(system, str) else None,
            )
        )
    return out


def run_code_eval(
    model_cfg: ModelConfig,
    prompts_path: str | Path | None,
    out: str | Path,
    grade_cfg: GradeConfig,
    sample: SampleConfig,
    thresholds: ThresholdsConfig | None = None,
    client: LLMClient | None = None,
    generator: ChatGenerator | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`caft eval code`: answer held-out coding prompts, grade `vulnerable`, report the vulnerable fraction."""
    out_dir = Path(out)
    questions = load_code_prompts(prompts_path)
    RunDir.create(
        out_dir,
        config=grade_cfg,
        models={"model": model_cfg.name_or_path},
        judges={"grade": grade_cfg.judge.model},
    )
    _sample(model_cfg, questions, out_dir, sample, generator)
    cfg = grade_cfg.model_copy(update={"metrics": ["vulnerable"]})
    _, summary = grade_file(
        out_dir / ANSWERS_FILE,
        out_dir,
        cfg,
        thresholds,
        client,
        kind="code",
        progress=progress,
        extra={
            "model": model_cfg.name_or_path,
            "adapter": model_cfg.adapter,
            "prompts": str(prompts_path or "caft default"),
        },
    )
    return summary


def run_eval_stage(
    model: ModelConfig,
    cfg: EvalConfig,
    out: str | Path,
    client_factory: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The evals of one model in a run: `out/misalignment/` and (with `code_prompts`) `out/code/`, each with
    its own summary.json, so `caft report RUN/...` finds them. `client_factory(grade_cfg, out_dir)` makes the
    judge client (tests pass a mock); each sub-eval resumes from its own files."""
    out_dir = Path(out)
    results: dict[str, Any] = {}
    factory = client_factory or make_client
    if cfg.misalignment:
        sub = out_dir / "misalignment"
        mcfg = MisalignmentEvalConfig(
            model=model,
            questions=cfg.questions,
            sample=cfg.sample,
            grade=cfg.grade,
            thresholds=cfg.thresholds,
        )
        results["misalignment"] = run_misalignment_eval(mcfg, sub, factory(cfg.grade, sub), progress=progress)
    if cfg.code_prompts:
        sub = out_dir / "code"
        results["code"] = run_code_eval(
            model,
            cfg.code_prompts,
            sub,
            cfg.grade,
            cfg.sample,
            cfg.thresholds,
            factory(cfg.grade, sub),
            progress=progress,
        )
    return results
