from __future__ import annotations

import json
from pathlib import Path

import pytest

from caft.errors import DataError
from caft.rundir import JsonlWriter, RunDir, atomic_write_json, read_jsonl


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    p = atomic_write_json(tmp_path / "a" / "x.json", {"k": [1, 2]})
    assert json.loads(p.read_text()) == {"k": [1, 2]}
    atomic_write_json(p, {"k": 3})
    assert json.loads(p.read_text()) == {"k": 3}
    assert sorted(x.name for x in p.parent.iterdir()) == ["x.json"]


def test_jsonl_writer_cuts_a_torn_tail_before_appending(tmp_path: Path) -> None:
    p = tmp_path / "rows.jsonl"
    with JsonlWriter(p) as w:
        w.write({"i": 0})
        w.write({"i": 1})
    with open(p, "a") as f:  # a crash mid-write leaves half a record
        f.write('{"i": 2, "partial')
    assert [r["i"] for r in read_jsonl(p)] == [0, 1]  # torn tail tolerated on read
    with JsonlWriter(p) as w:
        w.write({"i": 2})
    assert [r["i"] for r in read_jsonl(p)] == [0, 1, 2]


def test_read_jsonl_reports_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\nnot json\n{"b": 2}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r":2: expected a JSON object, got list"):
        read_jsonl(p)
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_stages_markers_and_manifest_without_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-" + "test-abcdefghijklmnopqrstuvwxyz0123"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    run = RunDir.create(
        tmp_path / "run",
        config={"judge": {"model": "openai/gpt-4.1", "api_key": secret, "note": f"key={secret}"}},
        models={"base": "tiny"},
        judges={"triage": "openai/gpt-4.1"},
    )
    text = (run.path / "manifest.json").read_text()
    assert secret not in text
    manifest = run.manifest()
    assert manifest is not None
    assert manifest["models"] == {"base": "tiny"} and manifest["judges"] == {"triage": "openai/gpt-4.1"}
    assert "api_key" not in manifest["config"]["judge"]
    assert "torch" in manifest["packages"] and manifest["hostname"]
    stage = run.stage("diff")
    assert not stage.done
    stage.mark_done({"n_candidates": 3})
    marker = stage.marker()
    assert stage.done and marker is not None and marker["info"] == {"n_candidates": 3}
    stage.invalidate()
    assert not stage.done
    again = RunDir.create(tmp_path / "run", config={})
    m2 = again.manifest()
    assert m2 is not None and m2["started_at"] == manifest["started_at"] and len(m2["resumed_at"]) == 1


def test_stage_names_are_checked(tmp_path: Path) -> None:
    from caft.errors import RunDirError

    with pytest.raises(RunDirError):
        RunDir(tmp_path).stage("../x")
