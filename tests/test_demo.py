"""The MiniLM demo: table and summary (fast), and the whole offline chain on small data (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caft.app.demo import DemoConfig, format_table, run_demo, summarize, write_demo_report


def test_summary_and_table_average_over_seeds() -> None:
    per_seed = {
        "0": {"plain": {"val": 1.0, "ood": 0.1}, "caft": {"val": 0.9, "ood": 0.8}, "k": 3},
        "1": {"plain": {"val": 1.0, "ood": 0.3}, "caft": {"val": 1.0, "ood": 0.6}, "k": 4},
    }
    summary = summarize(per_seed)
    assert summary["plain"]["ood"] == pytest.approx(0.2)
    assert summary["caft"]["val"] == pytest.approx(0.95)
    assert "random" not in summary
    table = format_table({"summary": summary, "per_seed": per_seed})
    assert "CAFT (offline judge)" in table and "80% / 60%" in table
    assert table.splitlines()[1].startswith("plain fine-tuning")


def test_html_report_escapes_labels_and_shows_every_condition(tmp_path: Path) -> None:
    per_seed = {
        "0": {
            "plain": {"val": 1.0, "ood": 0.05},
            "caft": {"val": 1.0, "ood": 0.9},
            "k": 1,
            "selected": [
                {"candidate": "pc:L1:0", "label": "<script>alert(1)</script> food", "confidence": 0.8}
            ],
        },
        "1": {"plain": {"val": 1.0, "ood": 0.15}, "caft": {"val": 0.98, "ood": 0.7}, "k": 0, "selected": []},
    }
    report = {
        "task": "sentiment-topic",
        "seeds": 2,
        "summary": summarize(per_seed),
        "per_seed": per_seed,
        "timings_s": {"train:plain": 12.5},
        "wall_s": 30.0,
    }
    page = write_demo_report(report, tmp_path).read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; food" in page
    assert page.count("<svg") == 1 and "CAFT (offline judge)" in page and "plain fine-tuning" in page
    assert "80.0%" in page and "90% / 70%" in page  # CAFT mean OOD and per-seed values
    assert "seed 1: 0 directions" in page and "train:plain" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch


def test_config_rejects_unknown_task() -> None:
    with pytest.raises(ValueError, match="sentiment-topic"):
        DemoConfig.model_validate({"task": "nope"})


@pytest.mark.slow
def test_demo_runs_offline_end_to_end_on_minilm(tmp_path: Path, minilm_dir: Path) -> None:
    cfg = DemoConfig(
        sizes={"train": 96, "val": 32, "ood": 32, "corpus": 64},
        n_components=4,
        null_per_layer=4,
        top_k_windows=5,
        epochs=1,
        model_path=str(minilm_dir),
    )
    report = run_demo(out=tmp_path, config=cfg)
    seed = report["per_seed"]["0"]
    for cond in ("plain", "caft", "test_time", "oracle"):
        assert 0.0 <= seed[cond]["ood"] <= 1.0 and 0.0 <= seed[cond]["val"] <= 1.0
    verdicts = (tmp_path / "seed0" / "triage" / "verdicts.jsonl").read_text().splitlines()
    assert len(verdicts) == 6 * 4  # every PC of every layer judged, nulls not
    assert all(json.loads(v)["judge"] == "offline-embedding" for v in verdicts)
    selection = json.loads((tmp_path / "seed0" / "triage" / "selection.json").read_text())
    assert len(selection["selected"]) == seed["k"]
    if seed["k"]:
        assert "random" in seed and "topk" in seed
    assert json.loads((tmp_path / "results.json").read_text())["timings_s"]["train:plain"] > 0
    assert "CAFT (offline judge)" in (tmp_path / "report.html").read_text()
    # a rerun resumes: every stage is found finished, results are identical
    again = run_demo(out=tmp_path, config=cfg)
    assert again["per_seed"] == report["per_seed"]
