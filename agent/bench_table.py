"""The judge benchmark's markdown table (`bench.md`), from the numbers `caft.agent.bench.run_bench` returns."""

from __future__ import annotations

from typing import Any


def _f(x: float | int | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:.1%}" if pct else (f"{x:.3f}" if isinstance(x, float) else str(x))


def format_bench(r: dict[str, Any]) -> str:
    """The markdown table of one benchmark run."""
    gt = r["ground_truth"]
    lines = [
        f"# Judge benchmark: {r['judge']} ({'blind' if r['blind'] else 'not blind'})",
        "",
        f"Ground truth: {gt['truly_undesired']}; r = Pearson correlation of the projection ({gt['projection']}) "
        f"with the cue / the label over {gt['rows']} rows ({gt['corpus']}).",
        f"Candidates: {r['candidates']}, truly undesired: {r['truly_undesired']} (base rate "
        f"{_f(r['base_rate'], True)}); held-out random directions judged blind among them: "
        f"{r['random_heldout']['n']}.",
        "",
        "| selection | n | precision | recall | random directions picked (FPR) |",
        "|---|---|---|---|---|",
    ]
    rh = r["random_heldout"]
    for name, key, fpr in (
        ("judge: undesired at the threshold (flagged)", "flagged", ("flagged", "fpr_flagged")),
        ("judge: selected (after the per-layer limits)", "selected", ("selected", "fpr_selected")),
        ("top PCs by variance, same count per layer", "topk_matched", None),
        ("the run's own selection (the subspace it trained with)", "run_selection", None),
    ):
        if key not in r:
            continue
        m = r[key]
        f = f"{rh[fpr[0]]} ({_f(rh[fpr[1]], True)})" if fpr else "-"
        lines.append(f"| {name} | {m['n']} | {_f(m['precision'], True)} | {_f(m['recall'], True)} | {f} |")
    lines += [
        "",
        f"AUROC of the undesired score (candidates): {_f(r['auroc'])}; truly undesired against held-out "
        f"random: {_f(r['auroc_vs_random'])}; mean score of random directions {_f(rh['mean_score'])}.",
    ]
    cc = r["cue_carriers"]
    lines.append(
        f"Cue carriers ({cc['definition']}): {cc['n']}; AUROC {_f(cc['auroc'])}; the judge's selection "
        f"precision {_f(cc['selected']['precision'], True)} / recall {_f(cc['selected']['recall'], True)}, "
        f"top-k {_f(cc['topk_matched']['precision'], True)} / {_f(cc['topk_matched']['recall'], True)}. "
        f"Held-out random directions that are themselves truly undesired: {rh['truly_undesired']} "
        f"({rh['selected_truly_undesired']} of them selected)."
    )
    cal = r.get("calibration")
    if cal:
        lines.append(
            f"Calibration on {cal.get('controls')} random controls (alpha {cal.get('alpha')}): threshold "
            f"{cal.get('threshold')} (policy {cal.get('policy_threshold')})."
        )
    down = r.get("downstream")
    if down:
        lines += ["", "| downstream (demo seed) | ID | OOD |", "|---|---|---|"]
        for cond, v in down.items():
            lines.append(f"| {cond} | {_f(v.get('val'), True)} | {_f(v.get('ood'), True)} |")
    s = r["seconds"]
    lines += [
        "",
        f"Wall time: judge {s['judge']} s, ground truth {s['ground_truth']} s, total {s['total']} s.",
    ]
    return "\n".join(lines) + "\n"
