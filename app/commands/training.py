"""`caft train [CONFIG] [--set a.b=c] [flags]`: plain fine-tuning or CAFT from the command line.

CONFIG holds the training settings (or is a whole run config; its `train:` section and `model:` are used).
Layering: preset < CONFIG < flags < `--set`. Heavy packages load inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from caft.app.commands.common import ConfigArg, SetOpt, flag_overrides, normalize_overrides

# Each flag and the training-config field it sets (`--set` can reach every other field).
TRAIN_FLAGS = {
    "data": "data.path",
    "eval_data": "data.eval_path",
    "skip_invalid": "data.skip_invalid",
    "base_model": "model.name_or_path",
    "subspace": "ablation.subspace",
    "random_subspace": "ablation.random",
    "ablation": "ablation.mode",
    "steer_coef": "ablation.steer_coef",
    "penalty_coef": "ablation.penalty_coef",
    "max_steps": "optim.max_steps",
    "gradient_checkpointing": "optim.gradient_checkpointing",
    "seed": "seed",
}

Opt = typer.Option


def train_command(
    config: ConfigArg = None,
    out: Annotated[
        Path | None, Opt("--out", help="Output directory (checkpoints, log, final model).")
    ] = None,
    data: Annotated[Path | None, Opt("--data", help="Training JSONL (chat or classification rows).")] = None,
    base_model: Annotated[str | None, Opt("--base-model", help="Hub id or local path to fine-tune.")] = None,
    subspace: Annotated[Path | None, Opt("--subspace", help="Subspace directory to ablate (CAFT).")] = None,
    random_subspace: Annotated[
        str | None, Opt("--random-subspace", help="Random-directions baseline: LAYER:K,... (e.g. 12:20).")
    ] = None,
    ablation: Annotated[
        str | None, Opt("--ablation", help="project | mean | detached | gradient | steer | penalty.")
    ] = None,
    steer_coef: Annotated[
        float | None, Opt("--steer-coef", help="Signed coefficient of --ablation steer.")
    ] = None,
    penalty_coef: Annotated[
        float | None, Opt("--penalty-coef", help="Weight of the soft one-sided --ablation penalty.")
    ] = None,
    preset: Annotated[
        str | None, Opt("--preset", help="Recipe defaults: em (LoRA chat), spurious (full FT) or encoder.")
    ] = None,
    max_steps: Annotated[int | None, Opt("--max-steps", help="Stop after N optimizer steps.")] = None,
    seed: Annotated[int | None, Opt("--seed", help="Seed of training and of --random-subspace.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    gradient_checkpointing: Annotated[
        bool, Opt("--gradient-checkpointing", help="Recompute activations in backward (less memory).")
    ] = False,
    skip_invalid: Annotated[bool, Opt("--skip-invalid", help="Skip malformed rows (counted).")] = False,
    eval_data: Annotated[Path | None, Opt("--eval-data", help="Held-out JSONL.")] = None,
    config_opt: Annotated[Path | None, Opt("--config", hidden=True, help="Same as CONFIG.")] = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune a model, optionally with a concept subspace ablated during training (CAFT)."""
    from caft.errors import ConfigError
    from caft.training.config import TrainConfig, build_train_config

    values = dict(locals())
    if random_subspace is not None and seed is not None:
        values["random_seed"] = seed
    flags = flag_overrides({**TRAIN_FLAGS, "random_seed": "ablation.random_seed"}, values)
    sets = normalize_overrides(set_ or [], "train", TrainConfig)
    source = config or config_opt
    cfg = build_train_config(preset, str(source) if source else None, None, [*flags, *sets])
    if out is None:
        raise ConfigError("no output directory: pass --out DIR")
    if ablation is not None and not cfg.ablation.active:
        raise ConfigError(f"--ablation {ablation} needs --subspace DIR or --random-subspace LAYER:K")
    from caft.training.trainer import train

    result = train(cfg, out, resume=resume)
    typer.echo(f"final: {result.final_path}")
    for key, value in result.metrics.items():
        typer.echo(f"  {key}: {value}")
