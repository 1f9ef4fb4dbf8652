"""Human review of a triage: one self-contained HTML page, and applying the edited selection.

The page needs no network (a Content-Security-Policy forbids any fetch; CSS and JS are inlined). It is rendered
from `templates/review.html.j2` with autoescape on, so every string that came from a model, a corpus or a file
is HTML-escaped; the embedded JSON has `<`, `>`
and `&` escaped so no text can close the script element. The script only toggles classes and builds the
exported `selection.json` from the embedded JSON.
"""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from caft.agent.config import SelectionPolicy
from caft.agent.schema import SELECTION_FILE, VERDICTS_FILE, Selection, VerdictRecord
from caft.errors import DataError
from caft.interp.schema import Dossier, Generation, Window
from caft.rundir import atomic_write_text

log = logging.getLogger(__name__)

REVIEW_FILE = "review.html"
INFO_FILE = "triage.json"
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _asset(name: str) -> str:
    return resources.files("caft.agent").joinpath(name).read_text("utf-8")


def json_for_script(obj: Any) -> str:
    """JSON safe inside <script type="application/json"> (no `</script>`, no `<!--`)."""
    text = json.dumps(obj, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


# ---- the page ---------------------------------------------------------------------------------------------
def _shade_css() -> str:
    rules = [
        f".p{i}{{background:rgba(240,90,20,{i / 10:.1f})}}.n{i}{{background:rgba(30,100,230,{i / 10:.1f})}}"
        for i in range(1, 11)
    ]
    return "".join(rules)


def _windows(ws: Sequence[Window]) -> list[dict[str, Any]]:
    """Tokens with their 0-10 shade level (classes p1..p10 / n1..n10; level 0 stays plain text)."""
    return [
        {
            "id": w.id,
            "value": w.value,
            "prefix": "n" if w.sign == "min" else "p",
            "shaded": [
                (tok, max(0, min(10, lvl)), v)
                for tok, lvl, v in zip(w.tokens, w.scaled, w.values, strict=False)
            ],
        }
        for w in ws
    ]


def _steering(gens: Sequence[Generation]) -> list[tuple[str, list[Generation]]]:
    by_prompt: dict[str, list[Generation]] = defaultdict(list)
    for g in gens:
        by_prompt[g.prompt].append(g)
    return [
        (prompt, sorted(gs, key=lambda g: (g.model, g.alpha == 0, g.alpha)))
        for prompt, gs in by_prompt.items()
    ]


def _summary(recs: Sequence[VerdictRecord]) -> tuple[str, float | None, str | None, str | None]:
    """(relation, confidence, label, verdict_ref) shown on the card and used in the export."""
    scored = [r for r in recs if r.verdict is not None]
    if not scored:
        return "unscored", None, None, None
    und = [r for r in scored if r.verdict is not None and r.verdict.relation == "undesired"]
    pick = max(und or scored, key=lambda r: r.verdict.confidence if r.verdict else 0.0)
    v = pick.verdict
    assert v is not None
    return v.relation, v.confidence, v.label, pick.exchange or f"{pick.method}:{pick.judge}"


def _card(d: Dossier, recs: Sequence[VerdictRecord], included: bool) -> dict[str, Any]:
    c = d.candidate
    relation, conf, label, _ = _summary(recs)
    search = " ".join(
        [c.id, label or ""] + [r.verdict.description for r in recs if r.verdict is not None]
    ).lower()
    return {
        "dossier": d,
        "cid": c.id,
        "layer": c.layer,
        "kind": c.kind,
        "relation": relation,
        "confidence": "" if conf is None else f"{conf:.4f}",
        "search": search,
        "included": included,
        "ranks": ", ".join(f"{k} #{v + 1}" for k, v in sorted(c.ranks.items())),
        "records": list(recs),
        "max_windows": _windows(d.max_examples),
        "min_windows": _windows(d.min_examples),
        "steering": _steering(d.steering.generations) if d.steering is not None else [],
    }


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("caft.agent", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pyrepr"] = repr
    return env.get_template("review.html.j2")


def build_review_html(
    dossiers: Sequence[Dossier],
    records: Sequence[VerdictRecord],
    selection: Selection,
    title: str = "caft triage review",
) -> str:
    """The complete page as a string (`templates/review.html.j2`, autoescaped)."""
    by_cand: dict[str, list[VerdictRecord]] = defaultdict(list)
    for r in records:
        by_cand[r.candidate].append(r)
    chosen = {s.candidate: s for s in selection.selected}
    known = {d.candidate.id for d in dossiers}
    missing = sorted(set(chosen) - known)
    if missing:
        log.warning("selected candidates without a dossier are not shown: %s", missing)
    cards = []
    cand_data: dict[str, Any] = {}
    for d in dossiers:
        cid = d.candidate.id
        recs = by_cand.get(cid, [])
        relation, conf, label, ref = _summary(recs)
        sel = chosen.get(cid)
        cand_data[cid] = {
            "layer": d.candidate.layer,
            "label": sel.label if sel and sel.label else label,
            "relation": sel.relation
            if sel and sel.relation
            else (None if relation == "unscored" else relation),
            "confidence": sel.confidence if sel and sel.confidence is not None else conf,
            "verdict_ref": sel.verdict_ref if sel and sel.verdict_ref else ref,
        }
        cards.append(_card(d, recs, cid in chosen))
    data = {"selection": selection.model_dump(mode="json"), "candidates": cand_data}
    policy = selection.policy
    return _template().render(
        csp=_CSP,
        title=title,
        css=_asset("review.css") + _shade_css(),
        js=_asset("review.js"),
        relations=("undesired", "intended", "unrelated", "unclear", "unscored"),
        layers=sorted({d.candidate.layer for d in dossiers}),
        cards=cards,
        policy_line=", ".join(f"{k}={v}" for k, v in policy.items() if v is not None and k != "review"),
        notes=selection.notes,
        data_json=json_for_script(data),
    )


# ---- run-folder helpers ------------------------------------------------------------------------------------
def resolve_triage_dir(run: str | Path) -> Path:
    """Accept a run directory (with a `triage/` folder) or the triage folder itself."""
    p = Path(run)
    for cand in (p, p / "triage"):
        if (cand / VERDICTS_FILE).is_file() or (cand / INFO_FILE).is_file():
            return cand
    raise DataError(
        f"{p} holds no triage results ({VERDICTS_FILE}); run `caft triage` first or pass its output folder"
    )


def write_review(
    run: str | Path, evidence_dir: str | Path | None = None, out: str | Path | None = None
) -> Path:
    """Write `review.html` for a triage folder and return its path."""
    from caft.agent.selection import load_verdicts, read_selection, select
    from caft.interp.schema import load_dossiers

    tdir = resolve_triage_dir(run)
    info: dict[str, Any] = {}
    if (tdir / INFO_FILE).is_file():
        info = json.loads((tdir / INFO_FILE).read_text(encoding="utf-8"))
    ev = evidence_dir or info.get("evidence")
    if ev is None:
        raise DataError(f"{tdir}/{INFO_FILE} does not name the evidence folder; pass --evidence DIR")
    dossiers = load_dossiers(ev)
    records = load_verdicts(tdir / VERDICTS_FILE) if (tdir / VERDICTS_FILE).is_file() else []
    if (tdir / SELECTION_FILE).is_file():
        selection = read_selection(tdir / SELECTION_FILE)
    else:
        selection = select(records, [d.candidate for d in dossiers], SelectionPolicy())
    title = f"caft triage review: {info.get('task', tdir.name)} ({info.get('judge', 'judge')}, {len(dossiers)} candidates)"
    page = build_review_html(dossiers, records, selection, title)
    target = Path(out) if out is not None else tdir / REVIEW_FILE
    atomic_write_text(target, page)
    return target
