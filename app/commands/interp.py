"""`caft diff`, `caft sae rank`, `caft sae train`, `caft evidence`.

    caft diff [CONFIG] [--run-dir DIR] [--set a.b=c]

With a whole run config, the command runs that stage of the run (as `caft run CONFIG --only STAGE`); with the
stage's own config it calls the library function on `--run-dir`. Heavy packages are imported inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from caft.app.commands.common import (
    ConfigArg,
    RunDirOpt,
    SetOpt,
    flag_overrides,
    load_stage_config,
    require_run_dir,
    run_stage_of,
)
from caft.rundir import DONE_MARKER

# Each flag and the stage-config field it sets (`--set` reaches every other field).
DIFF_FLAGS = {"skip_invalid": "inputs.skip_invalid"}
EVIDENCE_FLAGS = {"skip_invalid": "skip_invalid"}
SkipInvalidOpt = Annotated[
    bool,
    typer.Option(
        "--skip-invalid", help="Skip malformed data rows (each listed in the stage's skipped.jsonl)."
    ),
]

sae_app = typer.Typer(help="SAE latents: rank them (and train a small SAE).", no_args_is_help=True)


def _report(stage_dir: Path) -> None:
    marker = stage_dir / DONE_MARKER
    info = json.loads(marker.read_text(encoding="utf-8")).get("info", {}) if marker.is_file() else {}
    typer.echo(f"{stage_dir}: done")
    for k, v in info.items():
        typer.echo(f"  {k}: {v}")


def diff_cmd(
    config: ConfigArg = None,
    run_dir: RunDirOpt = None,
    skip_invalid: SkipInvalidOpt = False,
    set_: SetOpt = None,
) -> None:
    """Collect base vs fine-tuned activations on the same tokens and run streaming PCA on the differences."""
    from caft.interp.config import DiffConfig

    flags = flag_overrides(DIFF_FLAGS, {"skip_invalid": skip_invalid})
    loaded = load_stage_config(config, "diff", DiffConfig, set_ or [], flags=flags, run_dir=run_dir)
    if run_stage_of(loaded, "diff", config):
        return
    from caft.interp.pca import run_diff

    _report(run_diff(loaded.cfg, require_run_dir(loaded)))


@sae_app.command("rank")
def sae_rank_cmd(config: ConfigArg = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Rank SAE latents by mean activation difference, SAE encoding of the difference, and attribution."""
    from caft.interp.config import SAEConfig

    loaded = load_stage_config(config, "sae", SAEConfig, set_ or [], run_dir=run_dir)
    if run_stage_of(loaded, "sae", config):
        return
    from caft.interp.sae import run_sae_rank

    _report(run_sae_rank(loaded.cfg, require_run_dir(loaded)))


@sae_app.command("train")
def sae_train_cmd(
    layer: Annotated[int, typer.Option("--layer", help="Layer whose residual output the SAE reads.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the trained SAE (sae-lens format).")],
    config: ConfigArg = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train a small sae-lens SAE on base + fine-tuned activations of the run's diff inputs."""
    from caft.errors import DataError
    from caft.interp.config import SAEConfig
    from caft.interp.inputs import INPUTS_FILE, load_examples, make_batches
    from caft.interp.sae_train import collect_training_acts, train_sae
    from caft.interp.source import ActivationSource, resolve_models

    loaded = load_stage_config(config, "sae", SAEConfig, set_ or [], run_dir=run_dir)
    cfg, where = loaded.cfg, require_run_dir(loaded)
    inputs = where / "diff" / INPUTS_FILE
    if not inputs.is_file():
        raise DataError(f"{inputs} not found: run `caft diff` first (its inputs are the training tokens)")
    run_model = loaded.run.model if loaded.run is not None else None
    run_ft = loaded.run.finetuned if loaded.run is not None else None
    base_cfg, ft_cfg = resolve_models(cfg.model, cfg.finetuned, run_model, run_ft)
    source = ActivationSource.load(base_cfg, ft_cfg)
    layer = source.sites.resolve_layer(layer)
    batches = make_batches(load_examples(inputs), cfg.batch_size, source.pad_id)
    acts = collect_training_acts(source, batches, [layer], cfg.train.max_tokens)
    sae = train_sae(acts[layer], cfg.train, out, layer, f"trained:L{layer}")
    typer.echo(f"{out}: SAE with {sae.d_sae} latents on layer {layer} ({acts[layer].shape[0]} activations)")


def evidence_cmd(
    config: ConfigArg = None,
    run_dir: RunDirOpt = None,
    skip_invalid: SkipInvalidOpt = False,
    set_: SetOpt = None,
) -> None:
    """Build one evidence dossier per candidate: windows, difference summary, logit lens, steering."""
    from caft.interp.config import EvidenceConfig

    flags = flag_overrides(EVIDENCE_FLAGS, {"skip_invalid": skip_invalid})
    loaded = load_stage_config(config, "evidence", EvidenceConfig, set_ or [], flags=flags, run_dir=run_dir)
    if run_stage_of(loaded, "evidence", config):
        return
    from caft.interp.evidence import build_dossiers

    _report(build_dossiers(loaded.cfg, require_run_dir(loaded)))
