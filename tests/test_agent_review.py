"""The review page: escaping, self-containment, and (in headless Chromium) toggles, filters and export."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from agent_browser import browser, chromedriver_binary, chromium_binary

from caft.agent.config import SelectionPolicy
from caft.agent.fixtures import make_dossier, record, write_evidence
from caft.agent.review import build_review_html, write_review
from caft.agent.schema import Selection
from caft.agent.selection import read_selection, select, write_selection
from caft.interp.schema import load_directions
from caft.rundir import JsonlWriter, atomic_write_json
from caft.subspace import Subspace

XSS = '</script><script>document.title="pwned"</script><img src=x onerror=alert(1)>'


def _triage_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder with evidence, verdicts (one carrying hostile text) and a selection; returns (run, triage)."""
    dossiers = [
        make_dossier("pc:L1:0", 1, "evil", index=0, injection=XSS),
        make_dossier("pc:L1:1", 1, "code", index=1),
        make_dossier("pc:L2:0", 2, "evil", index=0),
        make_dossier("pc:L2:1", 2, "weather", index=1),
    ]
    ev = write_evidence(tmp_path, dossiers)
    tdir = tmp_path / "triage"
    recs = [
        record("pc:L1:0", "evil", 0.95),
        record("pc:L1:1", "code", 0.9),
        record("pc:L2:0", "evil", 0.8),
        record("pc:L2:1", "weather", 0.7),
    ]
    v0 = recs[0].verdict
    assert v0 is not None
    v0.description = "Villain talk. " + XSS
    with JsonlWriter(tdir / "verdicts.jsonl") as w:
        for r in recs:
            w.write(r.model_dump(mode="json"))
    sel = select(recs, [d.candidate for d in dossiers], SelectionPolicy(threshold=0.7))
    sel.directions = str(tmp_path / "diff" / "directions.safetensors")
    write_selection(tdir, sel, load_directions(Path(sel.directions)))
    atomic_write_json(
        tdir / "triage.json", {"evidence": str(ev), "task": "emergent-misalignment", "judge": "mock/j"}
    )
    return tmp_path, tdir


def test_page_escapes_all_model_text_and_needs_no_network(tmp_path: Path) -> None:
    run, tdir = _triage_run(tmp_path)
    page = write_review(run).read_text(encoding="utf-8")
    assert (tdir / "review.html").is_file()
    # hostile text appears only escaped, never as markup
    assert "<img" not in page
    assert page.count("<script") == 2  # the JSON block and the page logic, nothing injected
    assert "&lt;/script&gt;&lt;script&gt;" in page
    data_block = re.search(r'<script type="application/json" id="caft-data">(.*?)</script>', page, re.S)
    assert data_block is not None and "<" not in data_block.group(1)
    # self-contained: no external resources, and a CSP that forbids fetching
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)
    assert "default-src 'none'" in page
    # every candidate has a card with its toggle; the selected ones start checked
    assert page.count('class="include"') == 4
    assert len(re.findall(r'class="include" data-cid="[^"]+" checked', page)) == 2


def test_empty_selection_page_builds(tmp_path: Path) -> None:
    d = make_dossier("pc:L1:0", 1, "code")
    page = build_review_html([d], [], Selection(notes="nothing selected: no candidate has a scored verdict"))
    assert "nothing selected" in page and 'data-relation="unscored"' in page


needs_chromium = pytest.mark.skipif(
    chromium_binary() is None or chromedriver_binary() is None,
    reason="needs Debian packages chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)


@needs_chromium
def test_review_page_in_headless_chromium(tmp_path: Path) -> None:
    run, _ = _triage_run(tmp_path / "run")
    page = write_review(run)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with browser(tmp_path / "profile") as b:
        b.cdp("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        b.get(page.resolve().as_uri())
        assert b.js("return document.title;").startswith("caft triage review")
        assert b.js("return document.getElementById('n-included').textContent;") == "2"

        # filters: relation, layer, confidence, search
        def visible() -> list[str]:
            return list(
                b.js(
                    "return Array.from(document.querySelectorAll('.card:not(.hidden)')).map(c => c.dataset.cid);"
                )
            )

        def set_value(el_id: str, value: str) -> None:
            b.js(
                "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                "e.dispatchEvent(new Event('change'));",
                el_id,
                value,
            )

        set_value("f-relation", "undesired")
        assert visible() == ["pc:L1:0", "pc:L2:0"]
        set_value("f-layer", "2")
        assert visible() == ["pc:L2:0"]
        set_value("f-relation", "all")
        set_value("f-layer", "all")
        set_value("f-confidence", "0.85")
        assert visible() == ["pc:L1:0", "pc:L1:1"]
        set_value("f-confidence", "0")
        set_value("f-text", "weather")
        assert visible() == ["pc:L2:1"]
        set_value("f-text", "")

        # toggles by real clicks: drop one selected candidate, add an intended one
        b.click('input.include[data-cid="pc:L2:0"]')
        b.click('input.include[data-cid="pc:L1:1"]')
        assert b.js("return document.getElementById('n-included').textContent;") == "2"
        set_value("f-show", "included")
        assert visible() == ["pc:L1:0", "pc:L1:1"]
        b.click("#export")
        target = downloads / "selection.json"
        deadline = time.time() + 20
        while not target.is_file() and time.time() < deadline:
            time.sleep(0.1)
        assert target.is_file(), f"no download; folder holds {list(downloads.iterdir())}"
        errors = [e for e in b.console() if e.get("level") == "SEVERE"]
        assert errors == [], errors

    exported = json.loads(target.read_text(encoding="utf-8"))
    sel = Selection.model_validate(exported)
    assert [(s.candidate, s.layer, s.relation) for s in sel.selected] == [
        ("pc:L1:0", 1, "undesired"),
        ("pc:L1:1", 1, "intended"),
    ]
    assert sel.selected[0].label == "evil concept" and sel.selected[0].confidence == pytest.approx(0.95)
    assert exported["policy"]["review"]["added"] == ["pc:L1:1"]
    assert exported["policy"]["review"]["removed"] == ["pc:L2:0"]
    assert exported["policy"]["threshold"] == 0.7
    assert sel.directions is not None and sel.directions.endswith("directions.safetensors")

    # the exported file applies to a subspace with one column per chosen candidate
    applied = read_selection(target)
    sub_dir = tmp_path / "applied"
    write_selection(sub_dir, applied, load_directions(Path(applied.directions or "")))
    sub = Subspace.load(sub_dir / "subspace")
    assert sub.layers == [1] and sub.total_dims == 2
    assert [c.candidate for c in sub.columns[1]] == ["pc:L1:0", "pc:L1:1"]
