"""What a researcher needs to check a run's selection: per selected and per rejected-but-close direction, its
best windows, its contrast figures (when the dossier has them), its score against the random controls; the
per-layer counts; the config and git commit. Read from a finished run folder; feeds the demo's report page.

"Score against the controls": the undesired score on the judge's own scale (the offline judge's z, else the
undesired confidence of the verdict) and how many random control directions score at least as high (LLM
judges record their control verdicts; for the offline judge, whose z is already against the controls, the
controls' mean and sd of the raw score).
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from caft.interp.schema import Window, dossier_filename
from caft.interp.windows import window_words
from caft.rundir import iter_jsonl

CLOSE_REJECTED = 5
"""Rejected candidates shown per run: the highest-scoring ones that were not selected."""
WINDOWS_SHOWN = (3, 2)
"""Max and min windows shown per direction."""


def _score(rec: dict[str, Any]) -> float | None:
    scores = rec.get("scores") or {}
    if isinstance(scores.get("z"), int | float):
        return float(scores["z"])
    v = rec.get("verdict")
    if not isinstance(v, dict):
        return None
    return float(v.get("confidence", 0.0)) if v.get("relation") == "undesired" else 0.0


def _words(raw: dict[str, Any]) -> list[dict[str, Any]]:
    w = Window.model_validate(raw)
    return [{"text": x.text, "strong": x.scaled >= 5, "peak": x.peak} for x in window_words(w)]


def _dossier(run: Path, cid: str) -> dict[str, Any] | None:
    for folder in (run / "evidence" / "dossiers", run / "triage" / "controls" / "evidence" / "dossiers"):
        p = folder / dossier_filename(cid)
        if p.is_file():
            data = json.loads(p.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
    return None


def _contrast(d: dict[str, Any]) -> list[tuple[str, str]]:
    """The dossier's contrast section (minimal pairs), flattened to (name, figure) rows for display."""
    c = d.get("contrast")
    if not isinstance(c, dict):
        return []
    rows: list[tuple[str, str]] = []
    for k, v in c.items():
        if isinstance(v, int | float | str | bool):
            rows.append((str(k), f"{v:+.3g}" if isinstance(v, float) else str(v)))
        elif isinstance(v, list | dict):
            rows.append((str(k), json.dumps(v, ensure_ascii=False)[:300]))
    return rows


def run_evidence(run_dir: str | Path, n_close: int = CLOSE_REJECTED) -> dict[str, Any]:
    """Selected and closest rejected directions of one run with their evidence, per-layer counts, the
    controls' scores, the git commit. Empty when the run has no triage output."""
    run = Path(run_dir)
    sel_path, ver_path = run / "triage" / "selection.json", run / "triage" / "verdicts.jsonl"
    if not sel_path.is_file() or not ver_path.is_file():
        return {}
    selection = json.loads(sel_path.read_text(encoding="utf-8"))
    recs: dict[str, dict[str, Any]] = {}
    for r in iter_jsonl(ver_path):
        if isinstance(r, dict) and isinstance(r.get("candidate"), str):
            recs.setdefault(r["candidate"], r)
    is_control = {c for c in recs if ":null" in c}  # the triage stage's random controls (vec:L<l>:null<i>)
    control_scores = [s for c in is_control if (s := _score(recs[c])) is not None]
    picked = [c["candidate"] for c in selection.get("selected", [])]
    scored = sorted(
        (
            (s, c)
            for c, r in recs.items()
            if c not in is_control and c not in picked and (s := _score(r)) is not None
        ),
        reverse=True,
    )
    close = [c for _, c in scored[:n_close]]

    def entry(cid: str, chosen: bool) -> dict[str, Any]:
        rec = recs.get(cid, {})
        v = rec.get("verdict") if isinstance(rec.get("verdict"), dict) else {}
        s = _score(rec) if rec else None
        d = _dossier(run, cid) or {}
        n_max, n_min = WINDOWS_SHOWN
        above = sum(x >= s for x in control_scores) if s is not None and control_scores else None
        sc = rec.get("scores") or {}
        if above is not None:
            vs = f"{above} of {len(control_scores)} controls at or above"
        elif "null_mean" in sc and "null_std" in sc:  # the offline judge keeps the controls' mean and sd
            vs = f"controls' mean {sc['null_mean']:+.3f}, sd {sc['null_std']:.3f}"
        else:
            vs = "-"
        return {
            "id": cid,
            "layer": (d.get("candidate") or {}).get("layer"),
            "selected": chosen,
            "label": (v or {}).get("label", ""),
            "relation": (v or {}).get("relation", ""),
            "confidence": (v or {}).get("confidence"),
            "score": None if s is None else round(s, 3),
            "controls_above": vs,
            "max": [_words(w) for w in (d.get("max_examples") or [])[:n_max]],
            "min": [_words(w) for w in (d.get("min_examples") or [])[:n_min]],
            "contrast": _contrast(d),
            "rationale": (v or {}).get("rationale", ""),
        }

    manifest = run / "manifest.json"
    git: dict[str, Any] = {}
    if manifest.is_file():
        git = json.loads(manifest.read_text(encoding="utf-8")).get("git") or {}
    layers = Counter(int(c["layer"]) for c in selection.get("selected", []))
    return {
        "directions": [entry(c, True) for c in picked] + [entry(c, False) for c in close],
        "per_layer": sorted(layers.items()),
        "controls": len(control_scores),
        "control_max": round(max(control_scores), 3) if control_scores else None,
        "calibration": selection.get("calibration"),
        "policy": selection.get("policy", {}),
        "git": git,
    }


def template_env() -> jinja2.Environment:
    """The report templates (app/templates), autoescaped, strict about undefined names."""
    folder = Path(str(resources.files("caft.app") / "templates"))
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)), autoescape=True, undefined=jinja2.StrictUndefined
    )


SELECTION_PAGE = "selection.html"


def write_selection_page(run_dir: str | Path, out_dir: str | Path, title: str = "") -> Path | None:
    """`<out_dir>/selection.html`: the run's selected and closest rejected directions with their evidence,
    the per-layer counts, the config and git commit (one page, no scripts, no network). None without triage."""
    run = Path(run_dir)
    ev = run_evidence(run)
    if not ev:
        return None
    manifest = run / "manifest.json"
    config: Any = {}
    if manifest.is_file():
        config = json.loads(manifest.read_text(encoding="utf-8")).get("config", {})
    git = ev.get("git") or {}
    commits = [str(git.get("commit")) + (" (dirty)" if git.get("dirty") else "")] if git else []
    page = (
        template_env()
        .get_template("selection.html.j2")
        .render(
            title=title or f"caft run {run.name}: the selection and its evidence",
            evidence=[("selection", ev)],
            commits=commits,
            config=json.dumps(config, indent=1, sort_keys=True, default=str),
        )
    )
    from caft.rundir import atomic_write_text

    path = Path(out_dir) / SELECTION_PAGE
    atomic_write_text(path, page)
    return path
