"""`caft data ...`: build data sets. Light at import: heavy work happens inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(
    help="Build data sets (spurious-correlation classification tasks).", no_args_is_help=True
)


@data_app.command("spurious")
def spurious(
    kind: Annotated[
        str,
        typer.Option("--kind", help="sentiment-topic | topic-sentiment | gender-pronoun"),
    ] = "sentiment-topic",
    out: Annotated[Path, typer.Option("--out", help="Folder to write the task into.")] = Path("spurious"),
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling sentences.")] = 0,
) -> None:
    """Write a spurious-correlation task: train (cue 100% correlated), val, OOD (cue inverted), a generic
    evidence corpus where the concepts vary independently, task.yaml and meta.json."""
    from caft.app.spurious import write_spurious

    meta = write_spurious(kind, out, seed=seed)
    sizes = ", ".join(f"{k} {v}" for k, v in meta["sizes"].items())
    rule = meta["spurious_rule_accuracy"]
    typer.echo(f"wrote {kind} to {out} ({sizes})")
    typer.echo(
        f"spurious rule predicts the label: train {rule['train']:.0%}, val {rule['val']:.0%}, ood {rule['ood']:.0%}"
    )
