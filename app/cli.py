"""The `caft` command line. One subcommand per pipeline stage, each building a config and calling one library
function (the shared rules are in `caft.app.commands.common`). Heavy packages (torch, transformers, nnsight,
sae_lens, peft) are imported inside the commands that need them, so `caft --help` and API-only commands start
fast. Errors a user can act on (`CaftError`) are printed by one handler, without a traceback, with exit code 2
(or the error's own `exit_code`); logging is set up once, here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from caft import __version__
from caft.app.commands.agent import triage_app
from caft.app.commands.common import SetOpt
from caft.app.commands.data import data_app
from caft.app.commands.demo import demo_command
from caft.app.commands.evals import eval_app, grade_command, report_command
from caft.app.commands.interp import diff_cmd, evidence_cmd, sae_app
from caft.app.commands.training import train_command
from caft.errors import EXIT_ERROR, EXIT_INCOMPLETE, CaftError

# The fields `caft run --skip-invalid` sets: every data reader of the run.
RUN_SKIP_INVALID = ("train.data.skip_invalid", "diff.inputs.skip_invalid", "evidence.skip_invalid")
NOISY_LOGGERS = ("httpx", "httpx2", "httpcore", "openai", "anthropic", "urllib3", "filelock", "datasets")


def setup_logging(level: str = "INFO") -> None:
    """One logging setup for every command: timestamped lines on stderr; the HTTP clients' per-request INFO
    lines are silenced."""
    import logging

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def report_error(err: CaftError) -> int:
    """Print the error; its exit code (`caft.errors`: 2 config/data/model, 3 incomplete results)."""
    incomplete = err.exit_code == EXIT_INCOMPLETE
    typer.secho(f"{'incomplete' if incomplete else 'error'}: {err}", err=True, fg=typer.colors.RED)
    code = err.exit_code
    return code if isinstance(code, int) else EXIT_ERROR


class CaftGroup(TyperGroup):
    """The top-level command group: every subcommand's `CaftError` ends here as one red line and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CaftError as e:
            raise typer.Exit(code=report_error(e)) from None


app = typer.Typer(
    name="caft",
    help="Concept Ablation Fine-Tuning with an LLM judge agent in the loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=CaftGroup,
)
config_app = typer.Typer(help="Inspect and validate run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.callback()
def _root(
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO (default), WARNING or ERROR.")
    ] = "INFO",
) -> None:
    setup_logging(log_level)


@app.command()
def version() -> None:
    """Print the caft version."""
    print(__version__)


@app.command()
def doctor() -> None:
    """Check the environment: package versions, devices, offline mode, which API keys are present."""
    from caft.env import api_keys_present, devices, offline_mode, package_versions

    print(f"caft {__version__}  (python {sys.version.split()[0]}, {sys.executable})")
    print("packages:")
    for name, ver in package_versions().items():
        if name == "caft":
            continue
        print(f"  {name:<14} {ver or 'not installed'}")
    print("devices:")
    try:
        dev = devices()
    except ImportError as e:
        print(f"  cannot import torch: {e}")
    else:
        print(f"  cpu: {dev['cpu_count']} cores, torch threads {dev['torch_threads']}")
        for c in dev["cuda"]:
            print(f"  cuda:{c['index']}: {c['name']} ({c['memory_gib']} GiB)")
        if not dev["cuda"]:
            print("  cuda: none")
    print("offline mode:")
    for k, v in offline_mode().items():
        print(f"  {k:<22} {'yes' if v else 'no'}")
    from caft.env import builtin_model_lines

    print("built-in models (usable wherever a model id goes):")
    for line in builtin_model_lines():
        print(f"  {line}")
    print("API keys (presence only; values are never printed):")
    for k, present in api_keys_present().items():
        print(f"  {k:<24} {'present' if present else 'absent'}")


@app.command("run")
def run_command(
    config: Annotated[Path, typer.Argument(help="The run config YAML (see `caft config show`).")],
    set_: SetOpt = None,
    from_stage: Annotated[
        str | None,
        typer.Option("--from", help="Redo this stage and every later one (old folders go to .superseded/)."),
    ] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run just this stage.")] = None,
    no_check: Annotated[
        bool, typer.Option("--no-check", help="Skip the pre-flight check of judges, data and models.")
    ] = False,
    skip_invalid: Annotated[
        bool,
        typer.Option(
            "--skip-invalid",
            help="Skip malformed rows of the training data, diff inputs and evidence corpus (counted, listed).",
        ),
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="A dataset folder in the spurious format (docs/demo.md): classification."
        ),
    ] = None,
) -> None:
    """Run every stage of a CAFT run from one config: train -> diff (+ sae) -> evidence -> triage -> caft ->
    eval -> report. Finished stages with unchanged inputs are skipped, partial ones resume, stages whose inputs
    changed are redone with everything after them."""
    import json

    from caft.app.pipeline import run_pipeline
    from caft.app.run_config import RunConfig
    from caft.config import load_config
    from caft.errors import ConfigError
    from caft.rundir import SUMMARY_FILE
    from caft.training.distributed import launched_world_size

    if launched_world_size() > 1:  # every rank would run the judges and evals
        raise ConfigError(
            "caft run was started as one of several ranks (every rank would run the judges and evals); run "
            "`caft run` in one process with `--set launch.processes=N`: it starts each fine-tune as an N-rank "
            "job itself (docs/scaling.md)"
        )
    flags = [f"{path}=true" for path in RUN_SKIP_INVALID] if skip_invalid else []
    if data is not None:
        from caft.app.spurious import dataset_overrides

        flags += dataset_overrides(data)
    cfg = load_config(config, RunConfig, [*flags, *(set_ or [])])
    summary = run_pipeline(
        cfg, from_stage=from_stage, only=only, config_source=str(config), check=not no_check
    )
    print(json.dumps(summary.get("stages", {}), indent=2, default=str))
    state = "complete" if summary.get("complete") else "incomplete"
    print(f"run {state}: {Path(cfg.out_dir) / SUMMARY_FILE}")


@config_app.command("validate")
def config_validate(
    file: Annotated[Path, typer.Argument(help="A run config YAML file.")],
    set_: SetOpt = None,
) -> None:
    """Validate a run config and print it resolved (defaults filled in, overrides applied)."""
    from caft.app.run_config import RunConfig
    from caft.config import config_to_yaml, load_config

    cfg = load_config(file, RunConfig, set_ or [])
    print(config_to_yaml(cfg), end="")
    typer.secho(f"{file}: valid", err=True, fg=typer.colors.GREEN)


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="A run config YAML file.")],
    set_: SetOpt = None,
) -> None:
    """Validate a run config and run the pre-flight checks of every stage (judges answer, data parses, model
    configs and layers fit); nothing is run. Exit 2 with one report when anything is wrong."""
    from caft.app.pipeline import enabled_stages
    from caft.app.preflight import preflight, raise_if_problems
    from caft.app.run_config import RunConfig
    from caft.config import load_config

    cfg = load_config(file, RunConfig, set_ or [])
    raise_if_problems(preflight(cfg, enabled_stages(cfg)))
    typer.secho(f"{file}: valid, pre-flight passed", err=True, fg=typer.colors.GREEN)


@config_app.command("show")
def config_show() -> None:
    """List every field of the run config with its type, default and documentation."""
    from caft.app.run_config import RunConfig
    from caft.config import describe_fields

    for path, typ, doc, default in describe_fields(RunConfig, with_defaults=True):
        print(f"{path}  ({typ}){f'  default: {default}' if default is not None else ''}")
        if doc:
            for line in doc.splitlines():
                print(f"    {line.strip()}")


# Pipeline stages, in the order a run executes them; each module keeps heavy imports inside its commands.
app.command("demo")(demo_command)  # the offline MiniLM spurious-correlation demo
app.add_typer(data_app, name="data")  # spurious-correlation data sets
app.command("train")(train_command)  # fine-tuning, plain or with concept ablation
app.command("diff")(diff_cmd)  # interp: collection + streaming PCA
app.add_typer(sae_app, name="sae")  # interp: SAE latent rankings
app.command("evidence")(evidence_cmd)  # interp: evidence dossiers
app.add_typer(triage_app, name="triage")  # agent: judge candidates, review, apply a selection
app.add_typer(eval_app, name="eval")  # evals: misalignment, code, multiple choice
app.command("grade")(grade_command)  # batch grading of any answers file
app.command("report")(report_command)  # compare evaluated runs


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the `caft` script."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        return app(args=argv)
    except CaftError as e:  # raised before a command runs (e.g. while building one)
        raise SystemExit(report_error(e)) from None


if __name__ == "__main__":
    main()
