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

from caft.config import ModelConfig
from caft.errors import CaftError, DataError, IncompleteError
from caft.evals.config import EvalConfig, GradeConfig, MisalignmentEvalConfig, SampleConfig, ThresholdsConfig
from caft.evals.grader import GradeReport, PromptBook, estimate, grade, judge_capabilities
from caft.evals.inputs import Columns, load_answers
from caft.evals.questions import Question, load_judge_prompts, load_questions
from caft.evals.report import load_run, markdown
from caft.evals.sampling import ChatGenerator, make_generator, missing_answers, sample_answers
from caft.evals.summary import summarize_grades
from caft.jsonl import SKIPPED_FILE, ReadReport
from caft.llm import LLMClient
from caft.llm.types import Capabilities, LLMError
from caft.rundir import ANSWERS_FILE, GRADES_FILE, RunDir, atomic_write_text, iter_jsonl, lock_dir

log = logging.getLogger(__name__)

__all__ = [
    "GRADES_FILE",
    "GradingIncompleteError",
    "estimate_grading",
    "grade_file",
    "run_code_eval",
    "run_eval_stage",
    "run_misalignment_eval",
]


class GradingIncompleteError(IncompleteError):
    """Grading finished, but too many judge calls failed (or it stopped early) for its figures to stand.

    Every row and `summary.json` are written before this is raised; rerunning the same command grades the
    missing pairs and the `provider_error` rows again."""

    def __init__(self, message: str, folders: Sequence[Path]) -> None:
        super().__init__(message)
        self.folders = list(folders)


def provider_error_check(summary: dict[str, Any], cfg: GradeConfig, out: Path) -> str | None:
    """Why a finished grading is incomplete (too large a share of provider errors), or None when it is not."""
    n_err = int(summary.get("unscored_grades", {}).get("provider_error", 0))
    n_calls = int(summary.get("n_judged_grades", 0))
    if n_calls == 0 or n_err / n_calls <= cfg.max_provider_error_share:
        return None
    return (
        f"{out}: {n_err} of {n_calls} judge calls ended as provider errors ({n_err / n_calls:.1%}, more than "
        f"grade.max_provider_error_share = {cfg.max_provider_error_share:.1%}), so the figures in "
        f"{out / 'summary.json'} are incomplete. Every row is written; the `error` field of those rows in "
        f"{out / GRADES_FILE} says what the judge answered. Fix the judge, then rerun the same command: "
        "provider_error rows are graded again"
        + ("" if cfg.retry_provider_errors else " (set grade.retry_provider_errors=true for that)")
    )


def estimate_grading(
    answers_path: str | Path,
    out: str | Path,
    cfg: GradeConfig,
    capabilities: Capabilities | None = None,
    per_question_prompts: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The dry run of `grade_file`: what grading `answers_path` into `out` would cost, with the scoring rule
    the run would resolve (`capabilities` default: those of the provider `cfg.judge` builds, so its API
    key must be set, as for the run; with an explicit `cfg.scoring` a missing key only logs a warning)."""
    cols = Columns(cfg.columns.question, cfg.columns.answer, cfg.columns.id, cfg.columns.question_id)
    rows = load_answers(answers_path, cols, cfg.max_answer_chars)
    prompts = PromptBook(load_judge_prompts(cfg.judge_prompts), per_question_prompts)
    caps = capabilities
    if caps is None:
        try:
            caps = judge_capabilities(cfg)
        except LLMError as e:
            if cfg.scoring == "auto":
                raise CaftError(
                    f"the dry run must know whether {cfg.judge.model} gives logprobs (that decides the scoring "
                    f"rule and the number of calls), and its provider could not be built: {e}. Fix that, or "
                    "name the rule with --scoring"
                ) from None
            log.warning("%s; estimating with the scoring rule %s as given", e, cfg.scoring)
            caps = Capabilities(logprobs=cfg.scoring == "logprob_0_100")
    return estimate(rows, prompts, cfg, caps, Path(out) / GRADES_FILE)


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
    check: bool = True,
) -> tuple[GradeReport, dict[str, Any]]:
    """Grade an answers file into `out/grades.jsonl` and write `out/summary.json`.

    With `check`, a grading that finished with more than `cfg.max_provider_error_share` of its judge calls
    ending as provider errors raises `GradingIncompleteError`, after the rows and the summary are written. A
    run that stopped early (budget, fatal error, signal) returns with `report.stopped` set instead."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_dir(out_dir, f"grading into {out_dir}"):
        cols = Columns(cfg.columns.question, cfg.columns.answer, cfg.columns.id, cfg.columns.question_id)
        read = ReadReport()
        rows = load_answers(answers_path, cols, cfg.max_answer_chars, cfg.skip_invalid, read)
        (out_dir / SKIPPED_FILE).unlink(missing_ok=True)
        read.write_skipped(out_dir / SKIPPED_FILE)
        if read.skipped:
            log.warning(
                "%s: skipped %d invalid line(s), listed in %s",
                answers_path,
                len(read.skipped),
                out_dir / SKIPPED_FILE,
            )
        prompts = PromptBook(load_judge_prompts(cfg.judge_prompts), per_question_prompts)
        client = client or make_client(cfg, out_dir)
        atomic_write_text(
            out_dir / "inputs.json",
            json.dumps(
                {"answers": str(Path(answers_path).resolve()), "columns": cfg.columns.model_dump()}, indent=2
            )
            + "\n",
        )
        report = grade(rows, prompts, client, out_dir / GRADES_FILE, cfg, progress=progress)
        summary = summarize_grades(
            out_dir / GRADES_FILE,
            kind=kind,
            thresholds=thresholds or ThresholdsConfig(),
            extra={
                "grade_run": report.as_dict(),
                **({"skipped_input_lines": len(read.skipped)} if read.skipped else {}),
                **(extra or {}),
            },
        )
        atomic_write_text(out_dir / "summary.md", markdown([load_run(out_dir, out_dir.name)]))
        if check and report.stopped is None:
            why = provider_error_check(summary, cfg, out_dir)
            if why is not None:
                raise GradingIncompleteError(why, [out_dir])
        return report, summary


def _sample(
    model_cfg: ModelConfig,
    questions: list[Question],
    out: Path,
    sample: SampleConfig,
    generator: ChatGenerator | None,
) -> None:
    if generator is None and not missing_answers(questions, out / ANSWERS_FILE, sample):
        log.info("answers: all already in %s", out / ANSWERS_FILE)  # the model is not even loaded
        return
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
    """`caft eval misalignment`: sample answers (system prompts honoured), grade aligned + coherent, summarize.
    The folder is locked for the whole eval (`caft.rundir.lock_dir`)."""
    out_dir = Path(out)
    with lock_dir(out_dir, "caft eval misalignment"):
        return _misalignment_locked(cfg, out_dir, client, generator, progress)


def _misalignment_locked(
    cfg: MisalignmentEvalConfig,
    out_dir: Path,
    client: LLMClient | None,
    generator: ChatGenerator | None,
    progress: bool,
) -> dict[str, Any]:
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
    """`caft eval code`: answer held-out coding prompts, grade `vulnerable`, report the vulnerable fraction.
    The folder is locked for the whole eval (`caft.rundir.lock_dir`)."""
    out_dir = Path(out)
    questions = load_code_prompts(prompts_path)
    with lock_dir(out_dir, "caft eval code"):
        return _code_locked(
            model_cfg,
            questions,
            prompts_path,
            out_dir,
            grade_cfg,
            sample,
            thresholds,
            client,
            generator,
            progress,
        )


def _code_locked(
    model_cfg: ModelConfig,
    questions: list[Question],
    prompts_path: str | Path | None,
    out_dir: Path,
    grade_cfg: GradeConfig,
    sample: SampleConfig,
    thresholds: ThresholdsConfig | None,
    client: LLMClient | None,
    generator: ChatGenerator | None,
    progress: bool,
) -> dict[str, Any]:
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
    generator: ChatGenerator | None = None,
) -> dict[str, Any]:
    """The evals of one model in a run: `out/misalignment/` and (with `code_prompts`) `out/code/`, each with
    its own summary.json, so `caft report RUN/...` finds them. `client_factory(grade_cfg, out_dir)` makes the
    judge client (tests pass a mock); `generator` replaces the model's own (the test-time-only row); each
    sub-eval resumes from its own files.

    Raises `GradingIncompleteError` (after every sub-eval has run and written its summary) when one of them
    has too many provider errors or stopped early, so the stage is not marked done with figures that are
    missing grades; rerunning the stage grades what is missing."""
    out_dir = Path(out)
    results: dict[str, Any] = {}
    factory = client_factory or make_client
    problems: list[str] = []
    folders: list[Path] = []

    def guarded(name: str, sub: Path, run: Any) -> None:
        try:
            results[name] = summary = run()
        except GradingIncompleteError as e:
            problems.append(str(e))
            folders.append(sub)
            return
        stopped = summary.get("grade_run", {}).get("stopped")
        if stopped:
            problems.append(f"{sub}: grading stopped early ({stopped}); rerun to grade the missing pairs")
            folders.append(sub)

    if cfg.misalignment:
        sub_m = out_dir / "misalignment"
        mcfg = MisalignmentEvalConfig(
            model=model,
            questions=cfg.questions,
            sample=cfg.sample,
            grade=cfg.grade,
            thresholds=cfg.thresholds,
        )
        guarded(
            "misalignment",
            sub_m,
            lambda: run_misalignment_eval(
                mcfg, sub_m, factory(cfg.grade, sub_m), generator=generator, progress=progress
            ),
        )
    if cfg.code_prompts:
        sub_c = out_dir / "code"
        code_prompts = cfg.code_prompts
        guarded(
            "code",
            sub_c,
            lambda: run_code_eval(
                model,
                code_prompts,
                sub_c,
                cfg.grade,
                cfg.sample,
                cfg.thresholds,
                factory(cfg.grade, sub_c),
                generator=generator,
                progress=progress,
            ),
        )
    if problems:
        raise GradingIncompleteError("; ".join(problems), folders)
    return results


def run_eval_stages(
    rows: Sequence[tuple[str, ModelConfig, ChatGenerator | None]],
    cfg: EvalConfig,
    out: str | Path,
    client_factory: Any = None,
) -> dict[str, dict[str, Any]]:
    """`run_eval_stage` for every (row name, model, generator) of a run, into `out/<row>/`. With `grade.batch`
    and several rows, a first pass samples every row and submits its batches without waiting
    (`batch_max_wait_s: 0`), and the second waits for them: the provider works on all the models' batches at
    once, so the stage takes about the longest batch's time instead of their sum. Raises
    `GradingIncompleteError` as `run_eval_stage` does, for the first row that is incomplete after the wait."""
    out_dir = Path(out)
    if cfg.grade.batch and len(rows) > 1:
        submit = cfg.model_copy(update={"grade": cfg.grade.model_copy(update={"batch_max_wait_s": 0.0})})
        for name, model, gen in rows:
            try:
                run_eval_stage(model, submit, out_dir / name, client_factory=client_factory, generator=gen)
            except GradingIncompleteError as e:
                log.info("eval %s: batches submitted, not ended yet (%s)", name, str(e)[:200])
    return {
        name: run_eval_stage(model, cfg, out_dir / name, client_factory=client_factory, generator=gen)
        for name, model, gen in rows
    }
