"""`caft triage`: judge candidate directions, review the selection, apply an edited selection.

    caft triage --evidence RUN/evidence --task emergent-misalignment --judge openai/gpt-4.1 [--kind agent]
    caft triage review RUN            # writes RUN/triage/review.html
    caft triage apply selection.json  # builds the subspace from an (edited) selection
    caft triage bench --data DATA --run RUN [--judge offline|PROVIDER/MODEL]  # score a judge on ground truth

Heavy packages are imported inside the commands only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from caft.errors import CaftError, ConfigError

triage_app = typer.Typer(
    help="Judge candidate directions (LLM judge or agent), select the ones to ablate, review and apply.",
    invoke_without_command=True,
    no_args_is_help=False,
)

_BUDGET_KEYS = {"calls": "max_calls", "tokens": "max_tokens", "live": "max_live", "usd": "max_usd"}


def parse_budget(text: str) -> dict[str, Any]:
    """`calls=40,tokens=200000,live=5,usd=2.5` -> AgentBudget fields."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        field = _BUDGET_KEYS.get(key.strip())
        if not sep or field is None:
            raise ConfigError(
                f"--budget item {part!r} is not KEY=VALUE with KEY one of {', '.join(_BUDGET_KEYS)} "
                "(e.g. --budget calls=40,tokens=200000,live=5,usd=2)"
            )
        try:
            out[field] = float(value) if field == "max_usd" else int(float(value))
        except ValueError:
            raise ConfigError(f"--budget {key}: {value!r} is not a number") from None
    return out


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


@triage_app.callback()
def triage(
    ctx: typer.Context,
    evidence: Annotated[
        Path | None, typer.Option(help="The evidence stage folder (holds dossiers/).")
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Task YAML, or a bundled name: emergent-misalignment, spurious-correlation."),
    ] = None,
    judge: Annotated[
        str | None, typer.Option(help="Judge model, e.g. openai/gpt-4.1, anthropic/<model>.")
    ] = None,
    base_url: Annotated[str | None, typer.Option(help="Server URL for openai-compatible judges.")] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            help="single (one verdict per candidate), agent (tool-using) or offline-embedding (no API).",
        ),
    ] = None,
    budget: Annotated[
        str | None, typer.Option(help="Agent budgets: calls=N,tokens=N,live=N,usd=X (any subset).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <evidence>/../triage).")] = None,
    directions: Annotated[
        Path | None,
        typer.Option(help="directions.safetensors of the candidates (default: found next to evidence)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="A triage config YAML (or a run config; its `triage:` section is used)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a triage config field: --set selection.threshold=0.8"),
    ] = None,
    live_model: Annotated[
        str | None, typer.Option(help="Model (path or id) for live steered generation in agent mode.")
    ] = None,
    live_adapter: Annotated[str | None, typer.Option(help="Adapter to put on --live-model.")] = None,
    batch: Annotated[
        bool,
        typer.Option("--batch", help="Single kind: verdicts through the provider's batch API (half price)."),
    ] = False,
) -> None:
    """Judge every candidate in the evidence folder and write verdicts, selection.json and the subspace."""
    if ctx.invoked_subcommand is not None:
        return
    if batch:
        set_ = [*(set_ or []), "batch=true"]
    if evidence is None:
        typer.echo(ctx.get_help())
        _fail(
            ConfigError("pass --evidence DIR (the evidence stage folder), or use `caft triage review|apply`")
        )
        return
    try:
        result = _run(
            evidence,
            task,
            judge,
            base_url,
            kind,
            budget,
            out,
            directions,
            config,
            set_ or [],
            live_model,
            live_adapter,
        )
    except CaftError as e:
        _fail(e)
        return
    s = result.summary
    typer.echo(
        f"triage ({s['kind']}, {s['judge']}): {s.get('judged', s.get('verdicts', 0))} judged, "
        f"{s.get('unscored_total', 0)} unscored {s.get('unscored', {}) or ''}".rstrip()
    )
    usage = s.get("usage", {})
    typer.echo(
        f"usage: {usage.get('calls', 0)} calls, {usage.get('input_tokens', 0)} prompt + "
        f"{usage.get('output_tokens', 0)} completion tokens, ${usage.get('cost_usd', 0.0):.4f}"
    )
    if s.get("stopped"):
        typer.secho(
            f"stopped early: {s['stopped']} (results so far are kept; rerun to resume)",
            fg=typer.colors.YELLOW,
        )
    cal = s.get("calibration")
    if cal:
        typer.echo(
            f"threshold {cal.get('threshold')} from {cal.get('controls')} random controls (alpha {cal.get('alpha')}; "
            f"policy {cal.get('policy_threshold')}; controls at or above it: {cal.get('control_fpr')})"
        )
    if result.selection.selected:
        typer.echo(
            f"selected {len(result.selection.selected)} directions -> {result.out_dir / 'selection.json'}"
        )
    else:
        typer.echo(f"selected nothing: {result.selection.notes}")
    if result.subspace is not None:
        typer.echo(
            f"subspace: {result.subspace.total_dims} dims at layers {result.subspace.layers} -> "
            f"{result.out_dir / 'subspace'}"
        )
    typer.echo(f"review: caft triage review {result.out_dir}")


def _run(
    evidence: Path,
    task: str | None,
    judge: str | None,
    base_url: str | None,
    kind: str | None,
    budget: str | None,
    out: Path | None,
    directions: Path | None,
    config: Path | None,
    overrides: list[str],
    live_model: str | None,
    live_adapter: str | None,
) -> Any:
    from caft.agent.config import TriageConfig
    from caft.agent.triage import run_triage
    from caft.config import apply_overrides, read_yaml, validate_config

    extra: list[str] = []
    if task is not None:
        extra.append(f"task={task}")
    if judge is not None:
        extra.append(f"judge.model={judge}")
    if base_url is not None:
        extra.append(f"judge.base_url={base_url}")
    if kind is not None:
        extra.append(f"kind={kind}")
    if budget is not None:
        extra += [f"budget.{k}={v}" for k, v in parse_budget(budget).items()]
    data = read_yaml(config) if config is not None else {}
    if isinstance(data.get("triage"), dict):  # a whole run config: take its triage section
        data = data["triage"]
    source = str(config) if config is not None else "command line"
    cfg = validate_config(TriageConfig, apply_overrides(data, [*extra, *overrides]), source)
    steerer = None
    if live_model is not None:
        if cfg.kind != "agent":
            raise ConfigError("--live-model is used in agent mode only; add --kind agent")
        steerer = _load_steerer(evidence, directions, live_model, live_adapter)
    return run_triage(cfg, evidence, out, directions_path=directions, steerer=steerer)


def _load_steerer(evidence: Path, directions: Path | None, model: str, adapter: str | None) -> Any:
    from caft.agent.selection import find_directions
    from caft.agent.steer import HookSteerer
    from caft.config import ModelConfig
    from caft.interp.schema import load_directions, load_dossiers
    from caft.models import load_model

    dpath = directions or find_directions(evidence)
    if dpath is None:
        raise ConfigError("live steering needs the candidates' directions; pass --directions PATH")
    dossiers = load_dossiers(evidence)
    loaded = load_model(ModelConfig(name_or_path=model, adapter=adapter))
    scales = {d.candidate.id: d.steering.residual_norm for d in dossiers if d.steering is not None}
    layers = {d.candidate.id: d.candidate.layer for d in dossiers}
    return HookSteerer(loaded, load_directions(dpath), layers, scales)


@triage_app.command("review")
def review(
    run: Annotated[Path, typer.Argument(help="A run folder (with triage/) or the triage output folder.")],
    evidence: Annotated[
        Path | None, typer.Option(help="Evidence folder (default: recorded by the triage).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the page (default: <triage>/review.html).")
    ] = None,
) -> None:
    """Write one self-contained HTML page to review and edit the selection (opens offline in any browser)."""
    from caft.agent.review import write_review

    try:
        page = write_review(run, evidence, out)
    except CaftError as e:
        _fail(e)
        return
    typer.echo(f"review page: {page}")
    typer.echo(
        "open it in a browser, toggle candidates, export selection.json, then: caft triage apply selection.json"
    )


@triage_app.command("apply")
def apply(
    selection: Annotated[Path, typer.Argument(help="A selection.json (e.g. exported from the review page).")],
    directions: Annotated[
        Path | None, typer.Option(help="directions.safetensors (default: named in the file).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Subspace folder (default: subspace/ next to the file).")
    ] = None,
) -> None:
    """Build the subspace artifact from a selection.json."""
    from caft.agent.triage import apply_selection

    try:
        sel, sub, target = apply_selection(selection, directions, out)
    except CaftError as e:
        _fail(e)
        return
    if sub.is_empty:
        typer.echo(f"the selection is empty: wrote an empty subspace (no ablation) to {target}")
    else:
        typer.echo(
            f"subspace: {sub.total_dims} dims from {len(sel.selected)} candidates at layers {sub.layers} -> {target}"
        )


BENCH_FLAGS = {
    "data": "data",
    "run": "run",
    "out": "out",
    "results": "results",
    "heldout": "heldout_per_layer",
}


@triage_app.command("bench")
def bench(
    data: Annotated[Path, typer.Option(help="Dataset folder in the spurious format (meta.json, val, ood).")],
    run: Annotated[Path, typer.Option(help="Run folder with diff/, evidence/ and the triage controls.")],
    judge: Annotated[
        str | None,
        typer.Option(help="offline (the embedding judge), or an LLM: openai/gpt-4.1, anthropic/<model>, ..."),
    ] = None,
    base_url: Annotated[str | None, typer.Option(help="Server URL for openai-compatible judges.")] = None,
    replay: Annotated[
        Path | None,
        typer.Option(help="exchanges.jsonl of an earlier run: replay its replies through the mock provider."),
    ] = None,
    results: Annotated[
        Path | None, typer.Option(help="A demo seed folder (or its results.json): downstream OOD figures.")
    ] = None,
    heldout: Annotated[
        int | None, typer.Option(help="Random directions per layer mixed in blind among the candidates.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <run>/bench/<judge>).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="A bench config YAML (fields of caft.agent.bench.BenchConfig).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: --set triage.selection.threshold=0.8, --set r_cue=0.5"),
    ] = None,
) -> None:
    """Score a judge against correlation ground truth: precision, recall, AUROC, false positives on random
    directions mixed in blind; writes bench.json and bench.md."""
    import json

    from caft.agent.bench import BenchConfig, replay_provider, run_bench
    from caft.app.commands.common import flag_overrides
    from caft.config import apply_overrides, read_yaml, validate_config

    try:
        doc = read_yaml(config) if config is not None else {}
        manifest = run / "manifest.json"
        if "triage" not in doc and manifest.is_file():  # the judge as the run configured it
            triage = json.loads(manifest.read_text(encoding="utf-8")).get("config", {}).get("triage")
            if isinstance(triage, dict):
                triage.pop("mode", None)  # older manifests wrote both names; kind is the one kept
                doc["triage"] = triage
        values = {"data": data, "run": run, "out": out, "results": results, "heldout": heldout}
        extra = flag_overrides(BENCH_FLAGS, values)
        if judge in ("offline", "offline-embedding"):
            extra.append("triage.kind=offline-embedding")
        elif judge is not None:
            extra += ["triage.kind=single", f"triage.judge.model={judge}"]
        if base_url is not None:
            extra.append(f"triage.judge.base_url={base_url}")
        if replay is not None and judge is None:
            extra.append("triage.kind=single")
        cfg = validate_config(
            BenchConfig, apply_overrides(doc, [*extra, *(set_ or [])]), str(config or "flags")
        )
        provider = replay_provider(replay) if replay is not None else None
        report = run_bench(cfg, provider=provider)
    except CaftError as e:
        _fail(e)
        return
    from caft.agent.bench_table import format_bench

    typer.echo(format_bench(report))
    typer.echo(f"bench.json, bench.md and directions.jsonl in {report['out']}")
