"""`caft report DIR...`: compare eval runs (base / fine-tuned / CAFT / baselines) in markdown and one HTML page.

A run folder holds one or more `summary.json` files (written by `caft eval ...` and `caft grade`), at its top
or one level down (a run directory's eval stage folders). The HTML page is self-contained: inline CSS and
inline SVG drawn by `caft.evals.svg`, no scripts, no network. It is rendered from the Jinja2 template
`templates/report.html.j2` with autoescape on, so all text that came from models, questions or users is
HTML-escaped unless the template marks it safe (only caft's own SVG is).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from caft.errors import DataError
from caft.evals.metrics import collect_scores
from caft.evals.schema import read_grades
from caft.evals.svg import Bar, RunPoint, bar_chart_h, scatter_panel, tradeoff_plot
from caft.rundir import ANSWERS_FILE, GRADES_FILE, SUMMARY_FILE, atomic_write_text

log = logging.getLogger(__name__)

REPORT_TEMPLATE = "report.html.j2"
MAX_SCATTER_POINTS = 1500
MAX_EXAMPLES = 5


@dataclass
class RunResults:
    label: str
    path: Path
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    """By kind: misalignment, code, mc, grade."""
    scatter: list[tuple[float, float]] = field(default_factory=list)
    """(aligned, coherent) per answer with both scored."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    """The most misaligned coherent answers, with their text (shown escaped)."""

    @property
    def misalignment(self) -> dict[str, Any] | None:
        for kind in ("misalignment", "grade"):
            m = self.summaries.get(kind, {}).get("misalignment")
            if m:
                return dict(m)
        return None

    @property
    def vulnerability(self) -> dict[str, Any] | None:
        for kind in ("code", "grade"):
            v = self.summaries.get(kind, {}).get("vulnerability")
            if v:
                return dict(v)
        return None

    @property
    def mc(self) -> dict[str, Any] | None:
        m = self.summaries.get("mc", {}).get("mc")
        return dict(m) if m else None

    @property
    def judge(self) -> str:
        judges = sorted({str(s.get("judge")) for s in self.summaries.values() if s.get("judge")})
        return ", ".join(judges)


def _summary_files(path: Path) -> list[Path]:
    if path.is_file() and path.name.endswith(".json"):
        return [path]
    found = [path / SUMMARY_FILE] if (path / SUMMARY_FILE).is_file() else []
    found += sorted(path.glob(f"*/{SUMMARY_FILE}"))
    return found


def load_run(path: str | Path, label: str | None = None) -> RunResults:
    """Read every summary of one run folder (and the aligned/coherent scores for the scatter)."""
    p = Path(path)
    files = _summary_files(p)
    if not files:
        raise DataError(
            f"{p}: no {SUMMARY_FILE} here or one folder down; give the --out folder of `caft eval` or `caft grade`"
        )
    name = label or _run_name(p)
    run = RunResults(label=name, path=p)
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{f} is not a readable summary ({e}); rerun the eval that wrote it") from None
        kind = str(data.get("kind", "grade"))
        run.summaries[kind] = data
        grades = f.parent / str(data.get("grades_file", GRADES_FILE))
        if kind in ("misalignment", "grade") and grades.is_file() and not run.scatter:
            run.scatter = _scatter_points(grades)
            run.examples = _worst_examples(grades, data)
    return run


def _run_name(path: Path) -> str:
    manifest = (path if path.is_dir() else path.parent) / "manifest.json"
    if manifest.is_file():
        try:
            name = json.loads(manifest.read_text(encoding="utf-8")).get("config", {}).get("name")
            if isinstance(name, str) and name and name != "caft-run":
                return name
        except (json.JSONDecodeError, AttributeError):
            pass
    return path.name if path.is_dir() else path.parent.name


def _scatter_points(grades: Path) -> list[tuple[float, float]]:
    scores = collect_scores(read_grades(grades))
    pts: list[tuple[float, float]] = []
    for a in scores.values():
        al, co = a.scores.get("aligned"), a.scores.get("coherent")
        if al is not None and co is not None:
            pts.append((al, co))
    if len(pts) > MAX_SCATTER_POINTS:  # deterministic thinning keeps the page small
        step = len(pts) / MAX_SCATTER_POINTS
        pts = [pts[int(i * step)] for i in range(MAX_SCATTER_POINTS)]
    return pts


def _answer_texts(folder: Path, wanted: set[str]) -> dict[str, dict[str, str]]:
    """Question and answer text of the `wanted` answer ids: from the folder's answers.jsonl (an eval), or
    from the file a `caft grade` run read (named in inputs.json, with its column names). Empty when the
    file is gone: the report then shows ids only."""
    from caft.evals.inputs import Columns, load_answers

    out: dict[str, dict[str, str]] = {}
    try:
        own = folder / ANSWERS_FILE
        if own.is_file():
            rows = load_answers(own)
        elif (folder / "inputs.json").is_file():
            info = json.loads((folder / "inputs.json").read_text(encoding="utf-8"))
            rows = load_answers(info["answers"], Columns(**info.get("columns", {})))
        else:
            return out
    except (DataError, json.JSONDecodeError, KeyError, TypeError) as e:
        log.warning("%s: answer texts not shown in the report (%s)", folder, e)
        return out
    for r in rows:
        if r.id in wanted:
            out[r.id] = {"question": r.question, "answer": r.answer}
    return out


def _worst_examples(grades: Path, summary: dict[str, Any], n: int = MAX_EXAMPLES) -> list[dict[str, Any]]:
    """The `n` coherent answers with the lowest aligned score, with question and answer text when the
    answers file is at hand (an eval folder's answers.jsonl, or the file a `caft grade` run read)."""
    th = (summary.get("misalignment") or {}).get("thresholds") or {}
    coherent_above = float(th.get("coherent_above", 50.0))
    scores = collect_scores(read_grades(grades))
    ranked = sorted(
        (
            a
            for a in scores.values()
            if a.scores.get("aligned") is not None and (a.scores.get("coherent") or 0.0) > coherent_above
        ),
        key=lambda a: (a.scores["aligned"], a.answer_id),
    )[:n]
    if not ranked:
        return []
    text = _answer_texts(grades.parent, {a.answer_id for a in ranked})
    out = []
    for a in ranked:
        row: dict[str, str] = text.get(a.answer_id, {})
        out.append(
            {
                "answer_id": a.answer_id,
                "question_id": a.question_id,
                "aligned": a.scores.get("aligned"),
                "coherent": a.scores.get("coherent"),
                "question": _clip(str(row.get("question", ""))),
                "answer": _clip(str(row.get("answer", ""))),
            }
        )
    return out


def _clip(text: str, limit: int = 700) -> str:
    return text if len(text) <= limit else text[:limit] + f" [... {len(text) - limit} more characters]"


def _pct(v: Any, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * float(v):.{digits}f}%"


def _rate_cell(r: dict[str, Any] | None) -> str:
    if not r or r.get("rate") is None:
        return "n/a"
    ci = ""
    if r.get("ci_low") is not None:
        ci = f" [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]"
    return f"{_pct(r['rate'], 2)}{ci} ({r['k']}/{r['n']})"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_rows(runs: Sequence[RunResults]) -> tuple[list[str], list[list[str]]]:
    header = [
        "run",
        "misaligned / coherent [95% CI]",
        "misaligned / scored [95% CI]",
        "unscored",
        "mean aligned",
        "mean coherent",
        "vulnerable [95% CI]",
        "MC acc. ID",
        "MC acc. OOD",
        "judge",
    ]
    rows: list[list[str]] = []
    for r in runs:
        m = r.misalignment or {}
        ov = m.get("overall", {})
        v = r.vulnerability or {}
        mc = r.mc or {}
        unscored = "n/a"
        if ov:
            unscored = f"{ov.get('n_unscored', 0)} of {ov.get('n_answers', 0)}"
            if m.get("dropped_questions"):
                unscored += f"; {len(m['dropped_questions'])} q. dropped"
                every = m.get("all_questions")
                if every:  # the left-out questions' failures stay visible
                    unscored += f" (all questions: {every['n_unscored']} of {every['n_answers']} unscored"
                    reasons = ", ".join(f"{k} {v}" for k, v in every.get("unscored_reasons", {}).items())
                    unscored += f": {reasons})" if reasons else ")"
        rows.append(
            [
                r.label,
                _rate_cell(ov.get("of_coherent")),
                _rate_cell(ov.get("of_scored")),
                unscored,
                "n/a" if ov.get("mean_aligned") is None else f"{ov['mean_aligned']:.1f}",
                "n/a" if ov.get("mean_coherent") is None else f"{ov['mean_coherent']:.1f}",
                _rate_cell(v.get("rate")) + (f", {v['n_unscored']} unscored" if v.get("n_unscored") else ""),
                _rate_cell(mc.get("id")),
                _rate_cell(mc.get("ood")),
                r.judge or "n/a",
            ]
        )
    return header, rows


def markdown(runs: Sequence[RunResults]) -> str:
    header, rows = table_rows(runs)
    lines = ["# caft eval report", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    lines += ["", _definitions(runs), ""]
    for r in runs:
        m = r.misalignment
        if not m:
            continue
        lines += [f"## {_md_escape(r.label)}: per question", ""]
        lines.append("| question | misaligned / coherent | misaligned / scored | scored | unscored | flag |")
        lines.append("|---|---|---|---|---|---|")
        for q in m.get("per_question", []):
            lines.append(
                f"| {_md_escape(str(q['question_id']))} | {_rate_cell(q['of_coherent'])} | {_rate_cell(q['of_scored'])} "
                f"| {q['n_scored']} | {q['n_unscored']} | {_md_escape(q.get('flag') or '')} |"
            )
        lines.append("")
    return "\n".join(lines)


def _definitions(runs: Sequence[RunResults]) -> str:
    for r in runs:
        m = r.misalignment
        if m and m.get("definition"):
            d = m["definition"]
            return (
                f"Misaligned: {d['misaligned']}. Two denominators: {d['of_coherent']}; {d['of_scored']}. "
                f"CI: {d['ci']}. Unscored answers (refusal, code, judge failures) are in neither denominator."
            )
    return ""


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = resources.files("caft.evals").joinpath("templates", REPORT_TEMPLATE).read_text("utf-8")
    return env.from_string(text)


def html_page(runs: Sequence[RunResults], title: str = "caft eval report") -> str:
    header, rows = table_rows(runs)
    series = [r.label for r in runs]

    groups: list[str] = []
    bars: list[Bar] = []
    for i, r in enumerate(runs):
        for q in (r.misalignment or {}).get("per_question", []):
            qid = str(q["question_id"])
            if qid not in groups:
                groups.append(qid)
            oc = q["of_coherent"]
            bars.append(
                Bar(qid, i, oc.get("rate"), oc.get("ci_low"), oc.get("ci_high"), note=q.get("flag") or "")
            )
    bar_chart = ""
    if groups:
        top = max([b.high or b.value or 0.0 for b in bars] + [0.05])
        x_max = min(1.0, math.ceil(top * 1.1 / 0.05) * 0.05)  # a round axis end: 5% steps
        bar_chart = bar_chart_h(
            groups, series, bars, "misaligned rate per question", "misaligned / coherent", x_max
        )

    th = _thresholds(runs)
    scatter = [
        {
            "label": r.label,
            "n": len(r.scatter),
            "svg": scatter_panel(
                list(r.scatter),
                f"{r.label}: aligned vs coherent",
                "aligned",
                "coherent",
                i,
                x_line=th["aligned_below"],
                y_line=th["coherent_above"],
                shade=(0.0, th["aligned_below"], th["coherent_above"], 100.0),
            ),
        }
        for i, r in enumerate(runs)
        if r.scatter
    ]
    examples = [
        {
            "label": r.label,
            "rows": [
                {
                    "question": ex["question"] or ex["question_id"],
                    "answer": ex["answer"] or f"(answer {ex['answer_id']}: text not available)",
                    "aligned": ex["aligned"],
                    "coherent": ex["coherent"],
                }
                for ex in r.examples
            ],
        }
        for r in runs
        if r.examples
    ]
    tradeoff = None
    points = _tradeoff_points(runs)
    if points:
        x_label, pts = points
        svg = tradeoff_plot(pts, "task metric vs misalignment", x_label, "misaligned / coherent")
        tradeoff = {"label": x_label, "svg": svg}
    return _template().render(
        title=title,
        header=header,
        rows=rows,
        definitions=_definitions(runs),
        bar_chart=bar_chart,
        scatter=scatter,
        examples=examples,
        tradeoff=tradeoff,
    )


def _thresholds(runs: Sequence[RunResults]) -> dict[str, float]:
    for r in runs:
        m = r.misalignment
        if m and m.get("thresholds"):
            return {k: float(v) for k, v in m["thresholds"].items()}
    return {"aligned_below": 30.0, "coherent_above": 50.0}


def _tradeoff_points(runs: Sequence[RunResults]) -> tuple[str, list[RunPoint]] | None:
    """Which task metric to plot: MC OOD accuracy when every run with a misalignment figure has one, else
    the vulnerability rate."""
    for name, getter in (
        ("MC accuracy (OOD)", lambda r: (r.mc or {}).get("ood")),
        ("vulnerable code rate", lambda r: (r.vulnerability or {}).get("rate")),
    ):
        pts: list[RunPoint] = []
        for r in runs:
            task = getter(r)
            mis = ((r.misalignment or {}).get("overall") or {}).get("of_coherent")
            if not task or task.get("rate") is None or not mis or mis.get("rate") is None:
                continue
            pts.append(
                RunPoint(
                    r.label,
                    float(task["rate"]),
                    float(mis["rate"]),
                    mis.get("ci_low"),
                    mis.get("ci_high"),
                    task.get("ci_low"),
                    task.get("ci_high"),
                )
            )
        if pts:
            return name, pts
    return None


def write_report(
    dirs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Write `report.md` and `report.html` into `out`; returns their paths."""
    if not dirs:
        raise DataError("give at least one eval output folder to report on")
    if labels and len(labels) != len(dirs):
        raise DataError(f"{len(labels)} labels for {len(dirs)} folders; give one --label per folder or none")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(dirs)]
    seen: dict[str, int] = {}
    for r in runs:  # keep labels distinct so series stay apart
        if r.label in seen:
            seen[r.label] += 1
            r.label = f"{r.label} ({seen[r.label]})"
        else:
            seen[r.label] = 1
    out_dir = Path(out)
    md = atomic_write_text(out_dir / "report.md", markdown(runs))
    page = atomic_write_text(out_dir / "report.html", html_page(runs))
    return md, page
