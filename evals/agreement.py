"""Judge agreement: the same answers scored by two judges (`caft grade --rescore`), compared.

Judge choice moves misalignment numbers by an order of magnitude (one fixed answer set gave 9.85%, 5.75% and
0.50% with three judges), so a study should show how two judges agree: per metric the correlation of scores on
answers both scored (Pearson and Spearman), the mean difference, how often each left an answer unscored, and
the rates that the thresholds produce under each judge, side by side with their difference.
`rescore_agreement` adds the figures of `caft.evals.agreement_stats` over two or more judges (alpha, kappa,
consensus, the disagreements).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from caft.evals.config import ThresholdsConfig
from caft.evals.metrics import AnswerScores, collect_scores, misalignment
from caft.evals.schema import GradeRow, read_grades


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    return pearson(_ranks(a), _ranks(b)) if len(a) >= 2 else None


def _judge(rows: Iterable[GradeRow]) -> str:
    return ", ".join(sorted({r.judge for r in rows}))


def compare(
    grades_a: str | Path,
    grades_b: str | Path,
    thresholds: ThresholdsConfig | None = None,
    n_resamples: int | None = None,
) -> dict[str, Any]:
    """Agreement between two grade files over the answers they share."""
    th = thresholds or ThresholdsConfig()
    seed = th.bootstrap_seed
    rows_a, rows_b = read_grades(grades_a), read_grades(grades_b)
    a, b = collect_scores(rows_a), collect_scores(rows_b)
    common = sorted(set(a) & set(b))
    metrics = sorted({r.metric for r in rows_a} & {r.metric for r in rows_b})
    cut = {
        "aligned": ("<", th.aligned_below),
        "coherent": (">", th.coherent_above),
        "vulnerable": (">", th.vulnerable_above),
    }
    per_metric: dict[str, Any] = {}
    for m in metrics:
        pairs = [(a[i].scores.get(m), b[i].scores.get(m)) for i in common]
        both = [(x, y) for x, y in pairs if x is not None and y is not None]
        xa = np.asarray([x for x, _ in both], dtype=np.float64)
        xb = np.asarray([y for _, y in both], dtype=np.float64)
        entry: dict[str, Any] = {
            "n_common": len(pairs),
            "n_both_scored": len(both),
            "unscored_a": sum(1 for x, _ in pairs if x is None),
            "unscored_b": sum(1 for _, y in pairs if y is None),
            "pearson": pearson(xa, xb),
            "spearman": spearman(xa, xb),
            "mean_a": float(xa.mean()) if len(both) else None,
            "mean_b": float(xb.mean()) if len(both) else None,
            "mean_diff_b_minus_a": float((xb - xa).mean()) if len(both) else None,
            "mean_abs_diff": float(np.abs(xb - xa).mean()) if len(both) else None,
        }
        if m in cut and len(both):
            op, t = cut[m]
            hit_a = xa < t if op == "<" else xa > t
            hit_b = xb < t if op == "<" else xb > t
            entry["rule"] = f"{m} {op} {t:g}"
            entry["rate_a"] = float(hit_a.mean())
            entry["rate_b"] = float(hit_b.mean())
            entry["rate_diff"] = entry["rate_b"] - entry["rate_a"]
            entry["label_agreement"] = float((hit_a == hit_b).mean())
        per_metric[m] = entry
    out: dict[str, Any] = {
        "judge_a": _judge(rows_a),
        "judge_b": _judge(rows_b),
        "n_answers_a": len(a),
        "n_answers_b": len(b),
        "n_common": len(common),
        "metrics": per_metric,
    }
    if {"aligned", "coherent"} <= set(metrics):
        sub_a: dict[str, AnswerScores] = {i: a[i] for i in common}
        sub_b: dict[str, AnswerScores] = {i: b[i] for i in common}
        ma = misalignment(sub_a, th, n_resamples, seed).overall
        mb = misalignment(sub_b, th, n_resamples, seed).overall
        out["misaligned"] = {
            "of_coherent": {"a": ma.of_coherent.as_dict(), "b": mb.of_coherent.as_dict()},
            "of_scored": {"a": ma.of_scored.as_dict(), "b": mb.of_scored.as_dict()},
        }
    return out


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.2f}%" if pct else f"{v:.3f}"


def agreement_markdown(result: Mapping[str, Any]) -> str:
    """The agreement table as markdown."""
    lines = [
        "# Judge agreement",
        "",
        f"A = {result['judge_a']}; B = {result['judge_b']}; {result['n_common']} answers graded by both.",
        "",
        "| metric | both scored | unscored A | unscored B | Pearson r | Spearman rho | mean A | mean B | mean B-A "
        "| rule | rate A | rate B | B-A | same label |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, e in result["metrics"].items():
        lines.append(
            f"| {m} | {e['n_both_scored']} | {e['unscored_a']} | {e['unscored_b']} | {_f(e['pearson'])} "
            f"| {_f(e['spearman'])} | {_f(e['mean_a'])} | {_f(e['mean_b'])} | {_f(e['mean_diff_b_minus_a'])} "
            f"| {e.get('rule', '')} | {_f(e.get('rate_a'), True)} | {_f(e.get('rate_b'), True)} "
            f"| {_f(e.get('rate_diff'), True)} | {_f(e.get('label_agreement'), True)} |"
        )
    mis = result.get("misaligned")
    if mis:
        lines += ["", "| misaligned | A | B | B-A |", "|---|---|---|---|"]
        for denom in ("of_coherent", "of_scored"):
            ra, rb = mis[denom]["a"]["rate"], mis[denom]["b"]["rate"]
            diff = None if ra is None or rb is None else rb - ra
            lines.append(f"| {denom} | {_f(ra, True)} | {_f(rb, True)} | {_f(diff, True)} |")
    return "\n".join(lines) + "\n"


def judge_label(path: Path, rows: Iterable[GradeRow], taken: set[str]) -> str:
    """The judge name of a grade file, made unique among `taken` with its folder name (two runs of one judge
    are two raters)."""
    name = _judge(rows) or path.parent.name
    if name in taken:
        name = f"{name} ({path.parent.name})"
    while name in taken:
        name += "'"
    taken.add(name)
    return name


def rescore_agreement(
    grade_files: Sequence[str | Path],
    thresholds: ThresholdsConfig | None = None,
    n_resamples: int | None = None,
) -> dict[str, Any]:
    """Every agreement figure of two or more grade files of the same answers (the earlier gradings first, the
    rescore last): the pairwise table of `compare` (first vs last) and, under `judges`, Krippendorff's alpha
    (interval) per metric and per question, Cohen's kappa on the misaligned label per judge pair overall and
    per question, Fleiss' kappa, the majority consensus rate and the disagreements (`judge_agreement`)."""
    from caft.evals.agreement_stats import cohen_kappa, judge_agreement
    from caft.evals.stats import is_misaligned
    from caft.evals.summary import answer_records

    if len(grade_files) < 2:
        raise ValueError("judge agreement needs two or more grade files")
    th = thresholds or ThresholdsConfig()
    n_boot = th.bootstrap_resamples if n_resamples is None else n_resamples
    paths = [Path(p) for p in grade_files]
    out = compare(paths[0], paths[-1], th, n_boot)
    taken: set[str] = set()
    by_judge: dict[str, list[Any]] = {}
    sources: dict[str, str] = {}
    for p in paths:
        rows = read_grades(p)
        name = judge_label(p, rows, taken)
        by_judge[name] = answer_records(collect_scores(rows))
        sources[name] = str(p)
    metrics = set.intersection(*({r.metric for r in read_grades(p)} for p in paths))
    if not {"aligned", "coherent"} <= metrics:
        out["judges"] = None
        out["note"] = "alpha, kappa and consensus need aligned and coherent graded by every judge"
        return out
    res = judge_agreement(by_judge, th, n_boot, th.bootstrap_seed)
    labels = {
        j: {r.answer_id: (r.question_id, is_misaligned(r, th)) for r in recs} for j, recs in by_judge.items()
    }
    kappa_q: dict[str, dict[str, float | None]] = {}
    for pair in res.pairwise_kappa:
        la, lb = labels[pair.judge_a], labels[pair.judge_b]
        per_q: dict[str, tuple[list[bool], list[bool]]] = {}
        for aid, (qid, a) in sorted(la.items()):
            b = lb.get(aid, (qid, None))[1]
            if a is not None and b is not None:
                xs, ys = per_q.setdefault(qid, ([], []))
                xs.append(a)
                ys.append(b)
        for qid, (xs, ys) in sorted(per_q.items()):
            kappa_q.setdefault(qid, {})[f"{pair.judge_a} vs {pair.judge_b}"] = cohen_kappa(xs, ys)
    out["judges"] = {**res.as_dict(), "kappa_per_question": kappa_q, "sources": sources}
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def rescore_markdown(result: Mapping[str, Any], limit: int = 50) -> str:
    """`agreement_markdown` of the first and last grading, then the multi-judge figures and the
    disagreements."""
    lines = [agreement_markdown(result)]
    j = result.get("judges")
    if not j:
        return lines[0] + (f"\n{result['note']}\n" if result.get("note") else "")
    lines += [
        "## Agreement of all judges",
        "",
        f"Judges: {', '.join(j['judges'])}; {j['n_answers']} answers, {j['n_all_labelled']} labelled by all.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| Krippendorff's alpha (interval), aligned | {_f(j['alpha']['aligned'])} |",
        f"| Krippendorff's alpha (interval), coherent | {_f(j['alpha']['coherent'])} |",
    ]
    for p in j["pairwise_kappa"]:
        lines.append(
            f"| Cohen's kappa, misaligned label, {p['judge_a']} vs {p['judge_b']} (n = {p['n']}) "
            f"| {_f(p['kappa'])} |"
        )
    c = j["consensus"]
    lines += [
        f"| Fleiss' kappa | {_f(j['fleiss_kappa'])} |",
        f"| consensus (majority) misaligned rate | {_pct(c['rate'])} [{_pct(c['ci_low'])}, "
        f"{_pct(c['ci_high'])}] ({c['k']}/{c['n']}) |",
        *(f"| {name}'s rate on the same answers | {_pct(r)} |" for name, r in j["judge_rates"].items()),
        f"| largest judge rate / consensus | {_f(j['max_ratio_to_consensus'])} |",
        "",
        "| question | alpha aligned | alpha coherent | kappa (misaligned) |",
        "|---|---|---|---|",
    ]
    for q, a in j["alpha_per_question"].items():
        kq = "; ".join(f"{k}: {_f(v)}" for k, v in j["kappa_per_question"].get(q, {}).items()) or "n/a"
        lines.append(f"| {q} | {_f(a['aligned'])} | {_f(a['coherent'])} | {kq} |")
    lines += ["", f"## Disagreements ({len(j['disagreements'])})", ""]
    head = " | ".join(f"{name}: aligned / coherent / label" for name in j["judges"])
    lines += [f"| answer | question | kind | {head} |", "|---|---|---|" + "---|" * len(j["judges"])]
    for d in j["disagreements"][:limit]:
        cells = []
        for name in j["judges"]:
            v = d["judges"][name]
            label = {True: "misaligned", False: "ok", None: f"unscored ({v['unscored_reason']})"}[
                v["misaligned"]
            ]
            cells.append(f"{_f(v['aligned'])} / {_f(v['coherent'])} / {label}")
        lines.append(f"| {d['answer_id']} | {d['question_id']} | {d['kind']} | " + " | ".join(cells) + " |")
    if len(j["disagreements"]) > limit:
        lines.append(f"\n{len(j['disagreements']) - limit} more not shown.")
    return "\n".join(lines) + "\n"
