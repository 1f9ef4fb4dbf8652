"""CLI of the evals: `caft grade`, `caft eval misalignment|code|mc`, `caft report`.

Each command reads an optional YAML config (`--config`), applies its flags through one table per command
(`GRADE_FLAGS`, `EVAL_FLAGS`), then `--set` overrides, and calls one library function. Nothing heavy is imported
at module level, so `caft --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from caft.app.commands.common import SetOpt, flag_overrides, normalize_overrides
from caft.errors import EXIT_INCOMPLETE, CaftError

eval_app = typer.Typer(
    help="Evaluate a model: misalignment, code vulnerability, multiple choice.", no_args_is_help=True
)

Opt = typer.Option
JudgeOpt = Annotated[
    str | None, Opt("--judge", help="Judge model, <provider>/<model> (e.g. openai/gpt-4.1).")
]
BaseUrlOpt = Annotated[
    str | None, Opt("--base-url", help="Judge server address (openai-compatible, a proxy, a fake).")
]
ConcOpt = Annotated[int | None, Opt("--concurrency", help="Judge requests in flight at once.")]
MaxCostOpt = Annotated[
    float | None, Opt("--max-cost", help="Stop cleanly once the judge has spent this many dollars.")
]
ScoringOpt = Annotated[
    str | None,
    Opt("--scoring", help="auto | logprob_0_100 | sampled_mean | parsed_number (recorded per row)."),
]
PromptsOpt = Annotated[
    Path | None, Opt("--judge-prompts", help="YAML file of judge prompts (default: caft's own).")
]
ProgressOpt = Annotated[bool, Opt("--progress/--no-progress", help="Show the progress bar.")]
JudgeBatchOpt = Annotated[
    bool, Opt("--batch", help="Judge through the provider's batch API (half price, results within 24 h).")
]
ConfigOpt = Annotated[Path | None, Opt("--config", help="A YAML file with the command's config (flags win).")]

# Each flag and the grade-config field it sets.
GRADE_FLAGS = {
    "metrics": "metrics",
    "judge": "judge.model",
    "base_url": "judge.base_url",
    "concurrency": "judge.max_concurrency",
    "max_cost": "judge.max_cost_usd",
    "scoring": "scoring",
    "judge_prompts": "judge_prompts",
    "batch": "batch",
    "question_col": "columns.question",
    "answer_col": "columns.answer",
    "id_col": "columns.id",
    "question_id_col": "columns.question_id",
    "skip_invalid": "skip_invalid",
}
# Each flag and the eval-config field it sets (`caft eval misalignment|code`).
EVAL_FLAGS = {
    "model": "model.name_or_path",
    "adapter": "model.adapter",
    "device": "model.device",
    "dtype": "model.dtype",
    "chat_template": "model.chat.template",
    "questions": "questions",
    "samples": "sample.samples_per_paraphrase",
    "max_new_tokens": "sample.max_new_tokens",
    "batch_size": "sample.batch_size",
    "backend": "sample.backend",
    **{k: f"grade.{v}" for k, v in GRADE_FLAGS.items() if not k.endswith("_col")},
}


def _load(cls: Any, section: str, config: Path | None, flags: list[str], sets: list[str] | None) -> Any:
    """Config = YAML file (optional) <- flags <- --set overrides."""
    from caft.config import apply_overrides, read_yaml, validate_config

    data = read_yaml(config) if config is not None else {}
    data = apply_overrides(data, [*flags, *normalize_overrides(sets or [], section, cls)])
    return validate_config(cls, data, str(config) if config else "<flags>")


def _metric_list(metrics: str | None) -> list[str] | None:
    return [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None


def grade_command(
    answers: Annotated[
        Path | None, typer.Argument(help="JSONL or CSV with question and answer columns.")
    ] = None,
    out: Annotated[Path, Opt("--out", help="Output folder (grades.jsonl, summary.json, ...).")] = Path(
        "grades"
    ),
    metrics: Annotated[str | None, Opt("--metrics", help="Comma-separated judge metrics.")] = None,
    judge: JudgeOpt = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcOpt = None,
    max_cost: MaxCostOpt = None,
    scoring: ScoringOpt = None,
    judge_prompts: PromptsOpt = None,
    batch: JudgeBatchOpt = False,
    question_col: Annotated[str | None, Opt("--question-col", help="Column with the question.")] = None,
    answer_col: Annotated[str | None, Opt("--answer-col", help="Column with the answer.")] = None,
    id_col: Annotated[str | None, Opt("--id-col", help="Column with unique answer ids.")] = None,
    question_id_col: Annotated[
        str | None, Opt("--question-id-col", help="Column grouping answers by question.")
    ] = None,
    dry_run: Annotated[
        bool, Opt("--dry-run", help="Print calls, estimated tokens and dollars; grade nothing.")
    ] = False,
    rescore: Annotated[
        list[Path] | None,
        Opt(
            "--rescore",
            help="An earlier grades.jsonl: re-judge its answers with --judge and compare (repeatable: "
            "every earlier judge joins the agreement figures).",
        ),
    ] = None,
    skip_invalid: Annotated[
        bool,
        Opt("--skip-invalid", help="Skip lines that are not JSON objects (listed in OUT/skipped.jsonl)."),
    ] = False,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Grade answers with an LLM judge (resumable: a rerun grades only what is missing)."""
    from caft.evals.config import GradeConfig

    values = {**locals(), "metrics": _metric_list(metrics)}
    flags = flag_overrides(GRADE_FLAGS, values)
    if rescore:
        answers, flags = _rescore_inputs(rescore[0], answers, flags)
    if answers is None:
        raise CaftError(
            "give the answers file to grade (JSONL or CSV), e.g. caft grade answers.jsonl --out DIR"
        )
    cfg: GradeConfig = _load(GradeConfig, "grade", config, flags, set_)
    if rescore and any(out.resolve() == r.parent.resolve() for r in rescore):
        raise CaftError("--out must be a new folder for --rescore (the old grades stay where they are)")
    if dry_run:
        _dry_run(answers, out, cfg)
        return
    from caft.evals.pipeline import grade_file
    from caft.rundir import GRADES_FILE

    report, summary = grade_file(answers, out, cfg, progress=progress)
    _print_grade(report.as_dict(), summary)
    if rescore:
        from caft.evals.agreement import rescore_agreement, rescore_markdown
        from caft.rundir import atomic_write_json, atomic_write_text

        res = rescore_agreement([*rescore, out / GRADES_FILE])
        atomic_write_json(out / "agreement.json", res)
        md = rescore_markdown(res)
        atomic_write_text(out / "agreement.md", md)
        typer.echo(md)
    if report.stopped:
        typer.secho(
            f"stopped early: {report.stopped}; rerun the same command to continue",
            err=True,
            fg=typer.colors.YELLOW,
        )
        raise typer.Exit(code=EXIT_INCOMPLETE)


def _rescore_inputs(old: Path, answers: Path | None, flags: list[str]) -> tuple[Path | None, list[str]]:
    """Answers and metrics of an earlier grading, for a rescore with another judge."""
    from caft.rundir import iter_jsonl

    if not old.is_file():
        raise CaftError(f"--rescore {old}: file not found (give the grades.jsonl of the earlier run)")
    old_metrics = sorted({str(r.get("metric")) for r in iter_jsonl(old)})
    if not old_metrics:
        raise CaftError(f"--rescore {old}: no grades in it")
    given = {f.split("=", 1)[0] for f in flags}
    if "metrics" not in given:
        flags = [*flags, f"metrics={json.dumps(old_metrics)}"]
    inputs = old.parent / "inputs.json"
    if answers is None and inputs.is_file():
        info = json.loads(inputs.read_text(encoding="utf-8"))
        answers = Path(info["answers"])
        for k, v in info.get("columns", {}).items():
            if f"columns.{k}" not in given:
                flags = [*flags, f"columns.{k}={json.dumps(v)}"]
    if answers is None:
        raise CaftError(
            f"--rescore: {old.parent} has no inputs.json naming the answers; give the answers file too"
        )
    return answers, flags


def _dry_run(answers: Path, out: Path, cfg: Any) -> None:
    from caft.evals.pipeline import estimate_grading

    for k, v in estimate_grading(answers, out, cfg).items():
        typer.echo(f"{k:<24} {'unknown (model not in the price table)' if v is None else v}")


def _print_grade(report: dict[str, Any], summary: dict[str, Any]) -> None:
    typer.echo(
        f"graded {report['graded']} pairs ({report['already_done']} already there, {report['missing']} missing) "
        f"in {report['seconds']:.1f} s, ${report['cost_usd']:.4f}; unscored: {report['unscored'] or 'none'}"
    )
    st = summary.get("statistics")
    if st:  # the question-clustered figures (docs/evals.md)
        ov = st["overall"]
        n_out = ov["coverage"]["n_answers"] - ov["coverage"]["n_scored"]
        for denom in ("of_coherent", "of_scored", "incoherent_as_misaligned"):
            r = ov["figures"][denom]
            if r["rate"] is not None and r["ci_low"] is not None:
                typer.echo(
                    f"misaligned {denom}: {100 * r['rate']:.2f}% [{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}] "
                    f"({r['k']}/{r['n']}; unscored {n_out}; CI clustered by question)"
                )
        at_k = [m for m in st.get("misalign_at_k", []) if m["value"] is not None]
        if at_k:
            typer.echo("Misalign@k: " + ", ".join(f"@{m['k']} {100 * m['value']:.1f}%" for m in at_k))
    v = summary.get("vulnerability")
    if v and v["rate"]["rate"] is not None:
        typer.echo(
            f"vulnerable: {100 * v['rate']['rate']:.2f}% ({v['rate']['k']}/{v['rate']['n']}; unscored {v['n_unscored']})"
        )


ModelOpt = Annotated[str | None, Opt("--model", help="Model under test: hub id or local path.")]
AdapterOpt = Annotated[str | None, Opt("--adapter", help="A peft adapter to put on the model.")]
DeviceOpt = Annotated[str | None, Opt("--device", help="auto, cpu, cuda, cuda:N.")]
DtypeOpt = Annotated[str | None, Opt("--dtype", help="auto, float32, bfloat16, float16.")]
TemplateOpt = Annotated[str | None, Opt("--chat-template", help="model (the tokenizer's), chatml or plain.")]
SamplesOpt = Annotated[
    int | None, Opt("--samples", help="Answers per paraphrase (overrides the question file).")
]
MaxNewOpt = Annotated[int | None, Opt("--max-new-tokens", help="Answer length limit.")]
BatchOpt = Annotated[int | None, Opt("--batch-size", help="Generation batch size.")]
BackendOpt = Annotated[str | None, Opt("--backend", help="auto, transformers or vllm.")]


@eval_app.command("misalignment")
def eval_misalignment(
    out: Annotated[Path, Opt("--out", help="Output folder.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    questions: Annotated[
        Path | None, Opt("--questions", help="Question YAML (EM format); caft's own by default.")
    ] = None,
    judge: JudgeOpt = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcOpt = None,
    max_cost: MaxCostOpt = None,
    scoring: ScoringOpt = None,
    judge_prompts: PromptsOpt = None,
    batch: JudgeBatchOpt = False,
    samples: SamplesOpt = None,
    max_new_tokens: MaxNewOpt = None,
    batch_size: BatchOpt = None,
    backend: BackendOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    chat_template: TemplateOpt = None,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Sample answers to free-form questions, grade aligned + coherent, report misaligned rates (resumable)."""
    from caft.evals.config import MisalignmentEvalConfig
    from caft.evals.pipeline import run_misalignment_eval

    cfg = _load(MisalignmentEvalConfig, "eval", config, flag_overrides(EVAL_FLAGS, locals()), set_)
    summary = run_misalignment_eval(cfg, out, progress=progress)
    _print_grade(summary.get("grade_run", {}), summary)


@eval_app.command("code")
def eval_code(
    out: Annotated[Path, Opt("--out", help="Output folder.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    prompts: Annotated[
        Path | None, Opt("--prompts", help="Coding prompts: JSONL or YAML list of {id, prompt}.")
    ] = None,
    judge: JudgeOpt = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcOpt = None,
    max_cost: MaxCostOpt = None,
    scoring: ScoringOpt = None,
    judge_prompts: PromptsOpt = None,
    batch: JudgeBatchOpt = False,
    samples: SamplesOpt = None,
    max_new_tokens: MaxNewOpt = None,
    batch_size: BatchOpt = None,
    backend: BackendOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    chat_template: TemplateOpt = None,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer held-out coding prompts and report the fraction judged vulnerable (vulnerable > 50)."""
    from caft.evals.config import MisalignmentEvalConfig
    from caft.evals.pipeline import run_code_eval

    flags = [*flag_overrides(EVAL_FLAGS, locals()), 'grade.metrics=["vulnerable"]']
    cfg = _load(MisalignmentEvalConfig, "eval", config, flags, set_)
    summary = run_code_eval(cfg.model, prompts, out, cfg.grade, cfg.sample, cfg.thresholds, progress=progress)
    _print_grade(summary.get("grade_run", {}), summary)


def report_command(
    dirs: Annotated[list[Path], typer.Argument(help="Eval output folders (or run folders) to compare.")],
    out: Annotated[Path, Opt("--out", help="Where report.md and report.html go.")] = Path("report"),
    label: Annotated[
        list[str] | None, Opt("--label", help="Display name per folder, in order (repeatable).")
    ] = None,
    reference: Annotated[
        str | None,
        Opt("--reference", help="A run label: every other run gets its paired difference from it."),
    ] = None,
) -> None:
    """Compare eval runs in a markdown table and one self-contained HTML page with plots."""
    from caft.evals.report import write_report

    md, page = write_report(dirs, out, label or None, reference=reference)
    typer.echo(md.read_text(encoding="utf-8"))
    typer.echo(f"wrote {md} and {page}")


@eval_app.command("mc")
def eval_mc(
    out: Annotated[Path, Opt("--out", help="Output folder.")],
    model: Annotated[
        str, Opt("--model", help="A caft encoder classifier folder, or a causal LM (id or path).")
    ],
    id_data: Annotated[
        Path, Opt("--id", help="In-distribution test set (JSONL rows of the training task format).")
    ],
    ood_data: Annotated[Path | None, Opt("--ood", help="Out-of-distribution test set.")] = None,
    adapter: AdapterOpt = None,
    subspace: Annotated[
        Path | None,
        Opt("--subspace", help="Ablate this subspace at test time only (the test-time-only baseline)."),
    ] = None,
    ablation_mode: Annotated[str, Opt("--ablation-mode", help="Test-time ablation: project.")] = "project",
    batch_size: Annotated[int, Opt("--batch-size", help="Examples per forward pass.")] = 32,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Multiple-choice accuracy in distribution and out of distribution, optionally with a test-time ablation."""
    from caft.config import ModelConfig, apply_overrides, validate_config
    from caft.evals.mc import run_mc_eval

    flags = flag_overrides(
        {k: v.removeprefix("model.") for k, v in EVAL_FLAGS.items() if v.startswith("model.")}, locals()
    )
    cfg = validate_config(ModelConfig, apply_overrides({}, flags), "<flags>")
    summary = run_mc_eval(cfg, id_data, out, ood_data, subspace, ablation_mode, batch_size)
    for split, r in summary["mc"].items():
        typer.echo(
            f"accuracy {split}: {100 * r['rate']:.2f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] ({r['k']}/{r['n']})"
        )
