"""The demo's outputs a person reads: the plain-text table and the one-page HTML report (results.json stays
`caft.app.demo`'s)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from caft.app.demo import RUN_DIR
from caft.rundir import atomic_write_text

CONDITION_NAMES = {
    "plain": "plain fine-tuning",
    "caft": "CAFT (offline judge)",
    "random": "random subspace",
    "topk": "top PCs by variance",
    "test_time": "test-time ablation only",
    "oracle": "oracle topic probe (ref.)",
}


def condition_names(report: dict[str, Any]) -> dict[str, str]:
    """The conditions' display names; the CAFT row names the judge that selected its subspace."""
    config = report.get("config") or {}
    judge = config.get("triage_judge") or ("replayed LLM judge" if config.get("triage_replay") else None)
    return {**CONDITION_NAMES, "caft": f"CAFT ({judge})"} if judge else dict(CONDITION_NAMES)


def seed_values(per_seed: dict[str, Any], cond: str, key: str = "ood") -> list[float]:
    """`key` (val / ood) of condition `cond` on every seed that ran it."""
    return [float(r[cond][key]) for r in per_seed.values() if isinstance(r.get(cond), dict)]


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: condition, ID (val) accuracy, OOD accuracy, per-seed OOD."""
    names = condition_names(report)
    lines = [f"{'condition':<28}{'ID acc':>8}{'OOD acc':>9}   OOD per seed"]
    for cond, m in report["summary"].items():
        per = [f"{v:.0%}" for v in seed_values(report["per_seed"], cond)]
        lines.append(f"{names.get(cond, cond):<28}{m['val']:>8.1%}{m['ood']:>9.1%}   {' / '.join(per)}")
    return "\n".join(lines)


def loop_rows(rounds: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The closed loop's rounds as table cells: subspace size and per-layer counts, what each round added,
    the round model's ID / OOD, seconds."""

    def pct(ev: Any, key: str) -> str:
        v = ev.get(key) if isinstance(ev, dict) else None
        return f"{v:.1%}" if isinstance(v, (int, float)) else "-"

    rows = []
    for rd in rounds:
        counts = rd.get("counts") or {}
        rows.append(
            {
                "round": str(rd.get("round", "")),
                "dims": str(rd.get("subspace_dims", "-")),
                "counts": ", ".join(
                    f"L{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: int(kv[0]))
                )
                or "-",
                "added": str(rd.get("added", 0)),
                "selected": ", ".join(str(c) for c in rd.get("selected", [])) or "-",
                "val": pct(rd.get("eval"), "val"),
                "ood": pct(rd.get("eval"), "ood"),
                "seconds": str(rd.get("seconds", "-")),
            }
        )
    return rows


def write_demo_report(report: dict[str, Any], out: str | Path) -> Path:
    """One self-contained HTML page (no scripts, no network): ID / OOD accuracy per condition as a chart and
    a table with per-seed values, the directions the judge selected with their labels, and stage timings.
    All text is escaped."""
    from caft.evals.svg import Bar, bar_chart_h

    summary: dict[str, dict[str, float]] = report["summary"]
    per_seed: dict[str, dict[str, Any]] = report["per_seed"]
    names = condition_names(report)
    groups = [names.get(c, c) for c in summary]
    bars: list[Bar] = []
    for cond, name in zip(summary, groups, strict=True):
        ood = seed_values(per_seed, cond)
        bars.append(Bar(name, 0, summary[cond]["val"]))
        bars.append(
            Bar(name, 1, summary[cond]["ood"], min(ood), max(ood), note=f"(range over {len(ood)} seeds)")
        )
    chart = bar_chart_h(
        groups, ["ID (val)", "OOD (cue inverted)"], bars, "Accuracy per condition", "accuracy"
    )
    rows = [
        {
            "name": name,
            "val": f"{summary[cond]['val']:.1%}",
            "ood": f"{summary[cond]['ood']:.1%}",
            "per_seed": " / ".join(f"{v:.0%}" for v in seed_values(per_seed, cond)),
        }
        for cond, name in zip(summary, groups, strict=True)
    ]
    picks = [
        {
            "seed": seed,
            "directions": [
                {
                    "candidate": p["candidate"],
                    "label": p.get("label") or "",
                    "confidence": f"{float(p.get('confidence') or 0):.2f}",
                }
                for p in r.get("selected", [])
            ],
        }
        for seed, r in per_seed.items()
    ]
    loops = [{"seed": seed, "rounds": loop_rows(r["loop"])} for seed, r in per_seed.items() if r.get("loop")]
    from caft.app.report_evidence import run_evidence, template_env

    evidence = {seed: run_evidence(Path(out) / f"seed{seed}" / RUN_DIR) for seed in per_seed}
    spread = [
        {
            "name": name,
            "ood": " / ".join(f"{v:.1%}" for v in vals),
            "mean": f"{statistics.fmean(vals):.1%}",
            "sd": f"{statistics.stdev(vals):.1%}" if len(vals) > 1 else "-",
            "range": f"{min(vals):.1%} - {max(vals):.1%}",
        }
        for cond, name in zip(summary, groups, strict=True)
        if (vals := seed_values(per_seed, cond))
    ]
    commits = sorted(
        {
            str(e["git"].get("commit")) + (" (dirty)" if e["git"].get("dirty") else "")
            for e in evidence.values()
            if e.get("git")
        }
    )
    page = (
        template_env()
        .get_template("demo.html.j2")
        .render(
            title=f"caft demo: {report['task']}, {report['seeds']} seed(s)",
            judge=names["caft"].removeprefix("CAFT (").removesuffix(")"),
            chart=chart,
            rows=rows,
            picks=picks,
            timings=list(report.get("timings_s", {}).items()),
            wall_s=report.get("wall_s"),
            spread=spread,
            loops=loops,
            evidence=[(seed, e) for seed, e in evidence.items() if e],
            commits=commits,
            config=json.dumps(report.get("config", {}), indent=1, sort_keys=True),
        )
    )
    path = Path(out) / "report.html"
    atomic_write_text(path, page)
    return path
