"""What every `caft` command shares: the config argument, `--set`, flags that map onto config paths through one
table per command, and the rule that reads a stage's config from a stage-shaped or run-shaped YAML document.

    caft STAGE [CONFIG] [--set a.b=c ...] [--flag value ...]

CONFIG is either the stage's own config or a whole run config (then its `STAGE:` section is used, with the run's
`model`, `finetuned` and `out_dir`). `--set` paths may be written relative to the stage (`--set layers=[4]`) or
with the section prefix (`--set diff.layers=[4]`); in a run config, a name that is also a run-level field
(`model`, `finetuned`, `out_dir`, ...) means the run-level one (write `diff.model...` for the section's own). A key that names no field is an error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from caft.config import apply_overrides, read_yaml, validate_config
from caft.errors import ConfigError

C = TypeVar("C", bound=BaseModel)

ConfigArg = Annotated[
    Path | None,
    typer.Argument(help="YAML: the stage's own config, or a whole run config (its section is used)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config field: --set a.b=value (repeatable; values are parsed as YAML)."
    ),
]
RunDirOpt = Annotated[
    Path | None, typer.Option("--run-dir", help="Run directory (default: the config's `out_dir`).")
]

# Run-level fields that a stage command reads from a run config besides its own section.
RUN_LEVEL = ("model", "finetuned", "out_dir")


@dataclass
class Loaded:
    """A stage command's config and the run-level context a run config gave it."""

    cfg: Any
    run: Any | None
    """The whole validated RunConfig when CONFIG was run-shaped, else None."""
    out_dir: Path | None


def flag_overrides(table: Mapping[str, str], values: Mapping[str, Any]) -> list[str]:
    """`--set`-style overrides from the flags a user gave: `table` maps a flag's parameter name to the config
    path it sets; flags left at None (not given) set nothing. Values are written as YAML (JSON is YAML)."""
    import json

    out: list[str] = []
    for name, path in table.items():
        value = values.get(name)
        if value is None or value is False:
            continue
        if isinstance(value, Path):
            value = str(value)
        out.append(f"{path}={json.dumps(value)}")
    return out


def _field_names(cls: type[BaseModel]) -> list[str]:
    return sorted(cls.model_fields)


def _is_run_shaped(doc: Mapping[str, Any], section: str, cls: type[BaseModel]) -> bool:
    if section in doc:
        return True
    from caft.app.run_config import RunConfig

    own = set(cls.model_fields) | {"out_dir"}
    keys = set(doc)
    return bool(keys) and not keys <= own and keys <= set(RunConfig.model_fields)


def _route(item: str, section: str, cls: type[BaseModel], run_shaped: bool) -> str:
    """An override as a path in the document that is validated: the stage config, or the run config."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} is not of the form field.path=value (e.g. {section}.x=1)")
    key = key.strip()
    head = key.split(".", 1)[0]
    if run_shaped:
        from caft.app.run_config import RunConfig

        if head == section or head in RunConfig.model_fields:
            return f"{key}={value}"
        if head in cls.model_fields:
            return f"{section}.{key}={value}"
        valid = sorted(set(RunConfig.model_fields) | {f"{section}.{f}" for f in cls.model_fields})
        raise ConfigError(
            f"--set {key}: no such field in the run config or its {section!r} section; valid names start with "
            f"one of: {', '.join(valid)}"
        )
    if head == section and head not in cls.model_fields:
        key = key.split(".", 1)[1] if "." in key else ""
        head = key.split(".", 1)[0]
    if head not in cls.model_fields and head != "out_dir":
        raise ConfigError(
            f"--set {key or item}: {cls.__name__} has no field {head!r}; valid fields: "
            f"{', '.join(_field_names(cls))}"
        )
    return f"{key}={value}"


def load_stage_config(
    path: Path | None,
    section: str,
    cls: type[C],
    overrides: Sequence[str] = (),
    *,
    flags: Sequence[str] = (),
    run_dir: Path | None = None,
) -> Loaded:
    """Read `section`'s config (`cls`) from a stage- or run-shaped YAML document, then apply `flags` (overrides
    built by `flag_overrides`, relative to the stage) and `overrides` (the user's `--set`, which win)."""
    doc = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<command line>"
    run_shaped = _is_run_shaped(doc, section, cls)
    routed = [_route(o, section, cls, run_shaped) for o in [*flags, *overrides]]
    if overrides:
        source += " with --set " + " ".join(overrides)
    if run_shaped:
        from caft.app.run_config import RunConfig

        run = validate_config(RunConfig, apply_overrides(doc, routed), source)
        out_dir = run_dir or Path(run.out_dir)
        return Loaded(getattr(run, section), run, out_dir)
    data = apply_overrides(doc, routed)
    out = data.pop("out_dir", None)
    cfg = validate_config(cls, data, f"{source} ({section})")
    where = run_dir or (Path(out) if out else None)
    return Loaded(cfg, None, where)


def require_run_dir(loaded: Loaded) -> Path:
    if loaded.out_dir is None:
        raise ConfigError("no run directory: pass --run-dir DIR (or set `out_dir` in the config)")
    return loaded.out_dir


def run_stage_of(loaded: Loaded, stage: str, config_source: Path | None) -> bool:
    """When CONFIG was a whole run config, run `stage` through the pipeline exactly as `caft run --only STAGE`
    does (same input defaults, fingerprints and lock) and return True; otherwise return False."""
    if loaded.run is None:
        return False
    from caft.app.pipeline import run_pipeline

    run = loaded.run
    if loaded.out_dir is not None and Path(run.out_dir) != loaded.out_dir:
        run = run.model_copy(update={"out_dir": str(loaded.out_dir)})
    summary = run_pipeline(run, only=stage, config_source=str(config_source) if config_source else None)
    info = summary.get("stages", {}).get(stage, {})
    typer.echo(f"{Path(run.out_dir) / stage}: done")
    for k, v in info.items():
        typer.echo(f"  {k}: {v}")
    return True


def normalize_overrides(overrides: Sequence[str], section: str, cls: type[BaseModel]) -> list[str]:
    """`--set` items as paths relative to the stage config `cls` (a `section.` prefix is dropped); a key that
    names no field of `cls` is an error listing the valid ones."""
    return [_route(o, section, cls, run_shaped=False) for o in overrides]
