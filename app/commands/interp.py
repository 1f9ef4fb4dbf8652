"""`caft diff`, `caft sae rank`, `caft sae train`, `caft evidence`.

Each takes an optional YAML file that is either a whole run config (the stage's section is read from it,
plus the top-level `model`, `finetuned` and `out_dir`) or just the stage's own config, and `--set`
overrides on that document. Heavy packages are imported inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from caft.config import CaftConfig, ModelConfig

sae_app = typer.Typer(help="SAE latents: rank them (and train a small SAE).", no_args_is_help=True)

ConfigArg = Annotated[
    Path | None,
    typer.Argument(help="YAML: a run config (its stage section is used) or the stage config alone."),
]
RunDirOpt = Annotated[
    Path | None, typer.Option("--run-dir", help="Run directory (default: the config's `out_dir`).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field, e.g. --set layers=[4,8] or --set diff.layers=[4,8]."),
]


def load_stage_config(
    path: Path | None, section: str, cls: type[CaftConfig], overrides: list[str], run_dir: Path | None
) -> tuple[Any, ModelConfig | None, ModelConfig | None, Path]:
    """(stage config, run model, run finetuned, run dir) from a run- or stage-shaped YAML document."""
    from caft.config import apply_overrides, read_yaml, validate_config
    from caft.errors import ConfigError

    doc = read_yaml(path) if path is not None else {}
    doc = apply_overrides(doc, overrides)
    source = str(path) if path is not None else "<overrides>"
    model = finetuned = None
    if section in doc:
        stage_data = doc.get(section) or {}
        if doc.get("model") is not None:
            model = validate_config(ModelConfig, doc["model"], f"{source} (model)")
        if doc.get("finetuned") is not None:
            finetuned = validate_config(ModelConfig, doc["finetuned"], f"{source} (finetuned)")
        out_dir = doc.get("out_dir")
    else:
        stage_data = {k: v for k, v in doc.items() if k != "out_dir"}
        out_dir = doc.get("out_dir")
    cfg = validate_config(cls, stage_data, f"{source} ({section})")
    where = run_dir or (Path(out_dir) if out_dir else None)
    if where is None:
        raise ConfigError("no run directory: pass --run-dir DIR (or set `out_dir` in the config)")
    return cfg, model, finetuned, where


def _report(stage_dir: Path) -> None:
    marker = stage_dir / "DONE.json"
    info = json.loads(marker.read_text(encoding="utf-8")).get("info", {}) if marker.is_file() else {}
    typer.echo(f"{stage_dir}: done")
    for k, v in info.items():
        typer.echo(f"  {k}: {v}")


def diff_cmd(config: ConfigArg = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Collect base vs fine-tuned activations on the same tokens and run streaming PCA on the differences."""
    from caft.interp.config import DiffConfig
    from caft.interp.pca import run_diff

    cfg, model, finetuned, where = load_stage_config(config, "diff", DiffConfig, set_ or [], run_dir)
    _report(run_diff(cfg, where, model=model, finetuned=finetuned))


@sae_app.command("rank")
def sae_rank_cmd(config: ConfigArg = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Rank SAE latents by mean activation difference, SAE encoding of the difference, and attribution."""
    from caft.interp.config import SAEConfig
    from caft.interp.sae import run_sae_rank

    cfg, model, finetuned, where = load_stage_config(config, "sae", SAEConfig, set_ or [], run_dir)
    _report(run_sae_rank(cfg, where, model=model, finetuned=finetuned))


@sae_app.command("train")
def sae_train_cmd(
    layer: Annotated[int, typer.Option("--layer", help="Layer whose residual output the SAE reads.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the trained SAE (sae-lens format).")],
    config: ConfigArg = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train a small sae-lens SAE on base + fine-tuned activations of the run's diff inputs."""
    from caft.interp.collect import INPUTS_FILE, ActivationSource, collect_diffs, load_examples, make_batches
    from caft.interp.config import SAEConfig
    from caft.interp.pca import _resolve_models
    from caft.interp.sae import _collect_training_acts, train_sae

    cfg, model, finetuned, where = load_stage_config(config, "sae", SAEConfig, set_ or [], run_dir)
    inputs = where / "diff" / INPUTS_FILE
    if not inputs.is_file():
        from caft.errors import DataError

        raise DataError(f"{inputs} not found: run `caft diff` first (its inputs are the training tokens)")
    base_cfg, ft_cfg = _resolve_models(cfg.model, cfg.finetuned, model, finetuned)
    source = ActivationSource.load(base_cfg, ft_cfg)
    layer = source.sites.resolve_layer(layer)
    batches = make_batches(load_examples(inputs), cfg.batch_size, source.pad_id)
    acts = _collect_training_acts(source, batches, [layer], cfg.train.max_tokens, collect_diffs)
    sae = train_sae(acts[layer], cfg.train, out, layer, f"trained:L{layer}")
    typer.echo(f"{out}: SAE with {sae.d_sae} latents on layer {layer} ({acts[layer].shape[0]} activations)")


def evidence_cmd(config: ConfigArg = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Build one evidence dossier per candidate: windows, difference summary, logit lens, steering."""
    from caft.interp.config import EvidenceConfig
    from caft.interp.evidence import build_dossiers

    cfg, model, finetuned, where = load_stage_config(config, "evidence", EvidenceConfig, set_ or [], run_dir)
    _report(build_dossiers(cfg, where, model=model, finetuned=finetuned))
