"""Pre-flight: one report of everything wrong with a run config before any stage (or model) runs."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from caft.app.cli import app
from caft.app.preflight import check_jsonl, preflight
from caft.app.run_config import RunConfig
from caft.testing import save_tiny


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_broken_config_lists_every_problem_and_runs_nothing(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = save_tiny(tmp_path / "base", arch="llama", template="chatml")  # 3 layers
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff\xfe bytes"}\n')
    questions = tmp_path / "questions.yaml"
    questions.write_text("- this is: [not a question set\n")
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(base), "device": "cpu"},
        "task": "emergent-misalignment",
        "train": {"data": {"path": str(tmp_path / "missing.jsonl")}},
        "diff": {"layers": [1, 7]},
        "evidence": {"corpus": str(corpus)},
        "triage": {"judge": {"model": "openai/gpt-4.1"}},
        "eval": {
            "questions": str(questions),
            "grade": {
                "judge": {"model": "openai-compatible/j", "base_url": f"http://127.0.0.1:{_closed_port()}/v1"}
            },
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 2
    out = res.output
    assert "pre-flight found" in out
    assert "missing.jsonl does not exist" in out
    assert "layers [7] are out of range; it has 3 layers" in out
    assert "corpus.jsonl:2: not UTF-8" in out
    assert "OPENAI_API_KEY is not set" in out
    assert "does not answer" in out
    assert "eval.questions" in out
    assert not (tmp_path / "run").exists()  # nothing ran, not even the manifest


def test_missing_local_model_says_no_such_directory(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate(
        {"model": {"name_or_path": str(tmp_path / "nope")}, "triage": {"judge": {"model": "mock/x"}}}
    )
    problems = preflight(cfg, ["train"], network=False)
    assert any("nope does not exist (no such directory)" in p for p in problems)


def test_check_jsonl_fields(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a", "label": 1}) + "\n" + json.dumps({"text": "b"}) + "\n")
    msgs = check_jsonl(p, "train.data.path", [("text", "label"), ("prompt", "options", "label")])
    assert len(msgs) == 1 and "d.jsonl:2 lacks the fields" in msgs[0]
    (tmp_path / "e.jsonl").write_text("\n")
    assert "holds no rows" in check_jsonl(tmp_path / "e.jsonl", "x", [])[0]
    assert check_jsonl(p, "x", [("text",)]) == []


def test_example_configs_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "docs" / "examples"
    files = sorted(root.glob("*.yaml"))
    assert {f.name for f in files} >= {"run-chat.yaml", "run-classification.yaml"}
    runner = CliRunner()
    for f in files:
        res = runner.invoke(app, ["config", "validate", str(f)])
        assert res.exit_code == 0, (f, res.output)
        assert "valid" in res.output
