"""`caft train`: plain fine-tuning or CAFT from the command line. Heavy packages load inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from caft.errors import CaftError


def train_command(
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Training JSONL (chat `messages` rows, or classification rows)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (checkpoints, log, final adapter/model).")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="Hub id or local path of the model to fine-tune.")
    ] = None,
    subspace: Annotated[
        Path | None,
        typer.Option("--subspace", help="Subspace directory to ablate (none: plain fine-tuning)."),
    ] = None,
    ablation: Annotated[
        str | None, typer.Option("--ablation", help="project | mean | detached | gradient | steer.")
    ] = None,
    steer_coef: Annotated[
        float | None, typer.Option("--steer-coef", help="Coefficient c of --ablation steer (h + c v).")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="Recipe defaults: em (LoRA chat), spurious (full FT, choice letters) or encoder (classifier head).",
        ),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop after N optimizer steps.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")
    ] = False,
    random_subspace: Annotated[
        str | None,
        typer.Option("--random-subspace", help="Random-directions baseline: LAYER:K,... (e.g. 12:20,32:20)."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of training and of --random-subspace.")
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Skip malformed data rows (reported with a count).")
    ] = False,
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="Held-out JSONL.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML with the training settings (or a run config).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a field: --set optim.lr=1e-5 (repeatable, values parsed as YAML)."
        ),
    ] = None,
) -> None:
    """Fine-tune a model, optionally with a concept subspace ablated during training (CAFT)."""
    try:
        _run(**locals())
    except CaftError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None


def _run(
    data: Path | None,
    out: Path | None,
    base_model: str | None,
    subspace: Path | None,
    ablation: str | None,
    steer_coef: float | None,
    preset: str | None,
    max_steps: int | None,
    resume: bool,
    random_subspace: str | None,
    seed: int | None,
    skip_invalid: bool,
    eval_data: Path | None,
    config: Path | None,
    set_: list[str] | None,
) -> None:
    import logging

    from caft.errors import ConfigError
    from caft.training.config import build_train_config

    values: dict[str, Any] = {}
    if base_model is not None:
        values["model"] = {"name_or_path": base_model}
    data_v: dict[str, Any] = {}
    if data is not None:
        data_v["path"] = str(data)
    if eval_data is not None:
        data_v["eval_path"] = str(eval_data)
    if skip_invalid:
        data_v["skip_invalid"] = True
    if data_v:
        values["data"] = data_v
    abl: dict[str, Any] = {}
    if subspace is not None:
        abl["subspace"] = str(subspace)
    if random_subspace is not None:
        abl["random"] = random_subspace
        if seed is not None:
            abl["random_seed"] = seed
    if ablation is not None:
        abl["mode"] = ablation
    if steer_coef is not None:
        abl["steer_coef"] = steer_coef
    if abl:
        values["ablation"] = abl
    if max_steps is not None:
        values["optim"] = {"max_steps": max_steps}
    if seed is not None:
        values["seed"] = seed
    cfg = build_train_config(preset, str(config) if config else None, values, list(set_ or []))
    if out is None:
        raise ConfigError("no output directory: pass --out DIR")
    if ablation is not None and not cfg.ablation.active:
        raise ConfigError(f"--ablation {ablation} needs --subspace DIR or --random-subspace LAYER:K")

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from caft.training.trainer import train

    result = train(cfg, out, resume=resume)
    typer.echo(f"final: {result.final_path}")
    for key, value in result.metrics.items():
        typer.echo(f"  {key}: {value}")
