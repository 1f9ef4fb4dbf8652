"""`caft demo [CONFIG] [--set a.b=c] [--task ... | --data DIR] [--seeds N] [--conditions ...] [--model M] [--form F]
[--out DIR]`: the offline spurious-correlation demo (MiniLM, or a causal LM in multiple-choice form), run through the
same pipeline as `caft run`. Light at import."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from caft.app.commands.common import ConfigArg, SetOpt, flag_overrides, normalize_overrides

DEMO_FLAGS = {
    "task": "task",
    "seeds": "seeds",
    "conditions": "conditions",
    "model": "model",
    "form": "form",
    "data": "data",
}


def demo_command(
    config: ConfigArg = None,
    task: Annotated[
        str | None, typer.Option("--task", help="sentiment-topic | topic-sentiment | gender-pronoun")
    ] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Number of seeds (0..N-1).", min=1)] = None,
    conditions: Annotated[
        str | None,
        typer.Option("--conditions", help="Comma-separated: plain,caft,random,topk,test_time,oracle."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="A causal LM (e.g. gemma-3-270m) instead of MiniLM: multiple choice."),
    ] = None,
    form: Annotated[
        str | None, typer.Option("--form", help="Causal LM: single | double (multiple-choice form).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Your dataset folder in the spurious format (docs/demo.md) instead of --task."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder (a rerun resumes).")] = Path("caft-demo"),
    set_: SetOpt = None,
) -> None:
    """Replicate the paper's spurious-correlation result offline on all-MiniLM-L6-v2: plain fine-tuning,
    PCA on differences, evidence, offline judge, CAFT, and the baselines; prints ID / OOD accuracy. With
    --model (e.g. gemma-3-270m) the same run on a causal LM, the task as multiple choice."""
    from caft.app.demo import DemoConfig, run_demo
    from caft.app.demo_report import format_table
    from caft.config import apply_overrides, read_yaml, validate_config

    values = {
        "task": task,
        "seeds": seeds,
        "data": data,
        "conditions": [c.strip() for c in conditions.split(",") if c.strip()] if conditions else None,
        "model": model,
        "form": form,
    }
    overrides = [*flag_overrides(DEMO_FLAGS, values), *normalize_overrides(set_ or [], "demo", DemoConfig)]
    doc = read_yaml(config) if config is not None else {}
    cfg = validate_config(DemoConfig, apply_overrides(doc, overrides), str(config or "<flags>"))
    report = run_demo(out=out, config=cfg)
    typer.echo(format_table(report))
    for s, r in report["per_seed"].items():
        picked = ", ".join(f"{c['candidate']} ({c['label']})" for c in r.get("selected", [])) or "nothing"
        typer.echo(f"seed {s}: the offline judge selected {r.get('k', 0)}: {picked}")
        for rd in r.get("loop", []):
            ood = (rd.get("eval") or {}).get("ood")
            figure = f", OOD {ood:.1%}" if isinstance(ood, float) else ""
            typer.echo(
                f"  loop round {rd['round']}: +{rd.get('added') or 0} -> {rd.get('subspace_dims', '-')} dims{figure}"
            )
    typer.echo("stage wall time (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()))
    typer.echo(f"results: {out / 'results.json'}; report: {out / 'report.html'}")
