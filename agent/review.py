"""Human review of a triage: one self-contained HTML page, and applying the edited selection.

The page needs no network (a Content-Security-Policy forbids any fetch; CSS and JS are inlined). Every string
that came from a model, a corpus or a file is HTML-escaped on the Python side; the embedded JSON has `<`, `>`
and `&` escaped so no text can close the script element. The script only toggles classes and builds the
exported `selection.json` from the embedded JSON.
"""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from caft.agent.config import SelectionPolicy
from caft.agent.schema import SELECTION_FILE, VERDICTS_FILE, Selection, VerdictRecord
from caft.errors import DataError
from caft.interp.schema import Dossier, Generation, TokenScore, Window
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


# ---- evidence fragments ------------------------------------------------------------------------------------
def _window_html(w: Window) -> str:
    """Tokens shaded by their 0-10 value (classes p1..p10 / n1..n10); unshaded tokens stay plain text."""
    prefix = "n" if w.sign == "min" else "p"
    parts = []
    for tok, s, v in zip(w.tokens, w.scaled, w.values, strict=False):
        level = max(0, min(10, s))
        if level == 0:
            parts.append(esc(tok))
        else:
            parts.append(f'<span class="{prefix}{level}" title="{v:.3g}">{esc(tok)}</span>')
    return f'<div class="win"><span class="wid">{esc(w.id)} ({w.value:+.3g})</span>{"".join(parts)}</div>'


def _shade_css() -> str:
    rules = [
        f".p{i}{{background:rgba(240,90,20,{i / 10:.1f})}}.n{i}{{background:rgba(30,100,230,{i / 10:.1f})}}"
        for i in range(1, 11)
    ]
    return "".join(rules)


def _tokens_html(items: Sequence[TokenScore]) -> str:
    return (
        "".join(f"<span>{esc(repr(t.token))} {t.value:+.3g}</span>" for t in items)
        or '<span class="empty">none</span>'
    )


def _steering_html(gens: Sequence[Generation]) -> str:
    by_prompt: dict[str, list[Generation]] = defaultdict(list)
    for g in gens:
        by_prompt[g.prompt].append(g)
    rows = []
    for prompt, gs in by_prompt.items():
        gs = sorted(gs, key=lambda g: (g.model, g.alpha == 0, g.alpha))
        heads = "".join(f"<th>{esc(g.id)}<br>{esc(g.model)}, alpha {g.alpha:+g}</th>" for g in gs)
        cells = "".join(f"<td>{esc(g.text)}</td>" for g in gs)
        rows.append(
            f'<p><b>Prompt:</b> {esc(prompt)}</p><table class="gen"><tr>{heads}</tr><tr>{cells}</tr></table>'
        )
    return "".join(rows)


def _verdicts_html(recs: Sequence[VerdictRecord]) -> str:
    if not recs:
        return '<div class="verdict empty">no verdict</div>'
    parts = []
    for r in recs:
        who = f"{esc(r.method)} · {esc(r.judge)}" + (f" · sample {r.sample}" if r.sample else "")
        rel = f" · relevance {r.relevance:.1f}" if r.relevance is not None else ""
        if r.verdict is None:
            parts.append(
                f'<div class="verdict"><span class="badge unscored">unscored</span> {who}'
                f"<p>{esc(r.unscored or 'no reason recorded')}</p></div>"
            )
            continue
        v = r.verdict
        parts.append(
            f'<div class="verdict"><b>{esc(v.label)}</b> <span class="badge {esc(v.relation)}">{esc(v.relation)}'
            f"</span> confidence {v.confidence:.2f}{rel} · {who}"
            f"<p>{esc(v.description)}</p><p><i>Rationale:</i> {esc(v.rationale)}</p>"
            f'<p class="cited">cited: {esc(", ".join(v.evidence))}</p></div>'
        )
    return "".join(parts)


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


def _card(d: Dossier, recs: Sequence[VerdictRecord], included: bool, conf_override: float | None) -> str:
    c = d.candidate
    relation, conf, label, _ = _summary(recs)
    conf_shown = conf_override if conf_override is not None else conf
    search = " ".join(
        [c.id, label or ""] + [r.verdict.description for r in recs if r.verdict is not None]
    ).lower()
    ranks = ", ".join(f"{k} #{v + 1}" for k, v in sorted(c.ranks.items()))
    ev: list[str] = []
    if d.max_examples:
        ev.append(
            f"<details open><summary>Top-activating windows ({len(d.max_examples)})</summary>"
            + "".join(_window_html(w) for w in d.max_examples)
            + "</details>"
        )
    if d.min_examples:
        ev.append(
            f"<details><summary>Most negative windows ({len(d.min_examples)})</summary>"
            + "".join(_window_html(w) for w in d.min_examples)
            + "</details>"
        )
    if d.logit_lens is not None:
        ev.append(
            f'<details open><summary>Logit lens</summary><div class="lens">promoted: {_tokens_html(d.logit_lens.promoted)}'
            f'</div><div class="lens">suppressed: {_tokens_html(d.logit_lens.suppressed)}</div></details>'
        )
    if d.diff is not None:
        ev.append(
            f"<details><summary>Difference summary</summary><p>mean projection {d.diff.mean_projection:+.3g}, "
            f"variance share {d.diff.variance_share:.3g}, {d.diff.n_tokens} tokens</p>"
            f'<div class="lens">{_tokens_html(d.diff.top_tokens)}</div></details>'
        )
    if d.steering is not None and d.steering.generations:
        ev.append(
            f"<details><summary>Steered vs unsteered generations (alpha {d.steering.alpha:g})</summary>"
            + _steering_html(d.steering.generations)
            + "</details>"
        )
    checked = " checked" if included else ""
    conf_attr = "" if conf_shown is None else f"{conf_shown:.4f}"
    return (
        f'<section class="card" data-cid="{esc(c.id)}" data-layer="{c.layer}" data-relation="{esc(relation)}" '
        f'data-confidence="{conf_attr}" data-search="{esc(search)}">'
        f'<h2><label><input type="checkbox" class="include" data-cid="{esc(c.id)}"{checked}> include</label>'
        f'{esc(c.id)} <span class="badge">{esc(c.kind)} · layer {c.layer}</span>'
        f'<span class="badge {esc(relation)}">{esc(relation)}</span>'
        f'<span class="meta">{esc(ranks)}</span></h2>'
        f"{_verdicts_html(recs)}{''.join(ev)}</section>"
    )


def build_review_html(
    dossiers: Sequence[Dossier],
    records: Sequence[VerdictRecord],
    selection: Selection,
    title: str = "caft triage review",
) -> str:
    """The complete page as a string."""
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
        cards.append(_card(d, recs, cid in chosen, None))
    layers = sorted({d.candidate.layer for d in dossiers})
    layer_opts = "".join(f'<option value="{layer}">layer {layer}</option>' for layer in layers)
    rel_opts = "".join(
        f'<option value="{r}">{r}</option>'
        for r in ("undesired", "intended", "unrelated", "unclear", "unscored")
    )
    data = {"selection": selection.model_dump(mode="json"), "candidates": cand_data}
    policy = selection.policy
    policy_line = ", ".join(f"{k}={v}" for k, v in policy.items() if v is not None and k != "review")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_asset("review.css")}{_shade_css()}</style></head>
<body><header><h1>{esc(title)}</h1>
<div class="controls">
<label>relation <select id="f-relation"><option value="all">all</option>{rel_opts}</select></label>
<label>layer <select id="f-layer"><option value="all">all</option>{layer_opts}</select></label>
<label>min confidence <input id="f-confidence" type="number" min="0" max="1" step="0.05" value="0"></label>
<label>search <input id="f-text" type="search" placeholder="id, label, description"></label>
<label>show <select id="f-show"><option value="all">all</option><option value="included">included</option>
<option value="excluded">excluded</option></select></label>
<button id="export" type="button">Export selection.json</button>
<span><b id="n-included">0</b> included · <span id="n-visible">0</span> shown of {len(dossiers)}</span>
</div>
<div class="meta">policy: {esc(policy_line)}{" · " + esc(selection.notes) if selection.notes else ""}</div>
</header>
<main>{"".join(cards) if cards else '<p class="empty">no candidates</p>'}</main>
<pre id="export-preview" hidden></pre>
<script type="application/json" id="caft-data">{json_for_script(data)}</script>
<script>{_asset("review.js")}</script>
</body></html>
"""


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
