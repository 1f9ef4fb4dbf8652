"""`caft demo`: the offline MiniLM spurious-correlation demo. Light at import."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo_command(
    task: Annotated[
        str, typer.Option("--task", help="sentiment-topic | topic-sentiment | gender-pronoun")
    ] = "sentiment-topic",
    seeds: Annotated[int, typer.Option("--seeds", help="Number of seeds (0..N-1).", min=1)] = 1,
    out: Annotated[Path, typer.Option("--out", help="Output folder (a rerun resumes).")] = Path("caft-demo"),
) -> None:
    """Replicate the paper's spurious-correlation result offline on all-MiniLM-L6-v2: plain fine-tuning,
    PCA on differences, evidence, offline judge, CAFT, and the baselines; prints ID / OOD accuracy."""
    import logging

    from caft.app.demo import DemoConfig, format_table, run_demo
    from caft.errors import CaftError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = DemoConfig.model_validate({"task": task, "seeds": seeds})
    except ValueError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None
    try:
        report = run_demo(out=out, config=cfg)
    except CaftError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None
    typer.echo(format_table(report))
    for s, r in report["per_seed"].items():
        picked = ", ".join(f"{c['candidate']} ({c['label']})" for c in r.get("selected", [])) or "nothing"
        typer.echo(f"seed {s}: the offline judge selected {r.get('k', 0)}: {picked}")
    typer.echo("stage wall time (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()))
    typer.echo(f"results: {out / 'results.json'}; report: {out / 'report.html'}")
