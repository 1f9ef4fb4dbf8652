"""12.6: one JSONL reader for every command: line-numbered errors for bad bytes and bad JSON, `--skip-invalid`
that counts and lists what it skipped, data checked before any model loads, and missing local model paths
named as such."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from evals_helpers import write_answers
from interp_helpers import chat_rows, make_pair
from typer.testing import CliRunner

from caft.app.cli import app
from caft.config import ModelConfig
from caft.errors import DataError, ModelError
from caft.interp.source import ActivationSource
from caft.jsonl import SKIP_HINT, ReadReport, iter_rows, read_jsonl
from caft.models import load_model
from caft.testing.fakellm import FakeLLM
from caft.testing.grading import fake_judge
from caft.training.data import read_chat_jsonl

GOOD = json.dumps({"messages": chat_rows(1)[0]["messages"]}).encode()


def _bad_file(path: Path) -> Path:
    """Line 2 holds non-UTF-8 bytes, line 4 is not JSON, line 5 is a list; lines 1, 3 and 6 are fine."""
    path.write_bytes(
        b"\n".join([GOOD, b'{"messages": "caf\xff\xfe"}', GOOD, b'{"messages": [', b"[1, 2]", GOOD]) + b"\n"
    )
    return path


def test_errors_name_the_line(tmp_path: Path) -> None:
    path = _bad_file(tmp_path / "d.jsonl")
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text \(invalid start byte at byte 17") as e:
        list(iter_rows(path, hint=SKIP_HINT))
    assert SKIP_HINT in str(e.value)
    rep = ReadReport()
    rows = list(iter_rows(path, skip_invalid=True, report=rep))
    assert [r.line for r in rows] == [1, 3, 6] and rep.rows == 6 and rep.kept == 3
    assert [n for n, _ in rep.skipped] == [2, 4, 5]
    assert "not valid JSON" in rep.skipped[1][1] and "got list" in rep.skipped[2][1]
    rep.write_skipped(tmp_path / "skipped.jsonl")
    listed = read_jsonl(tmp_path / "skipped.jsonl")
    assert [r["line"] for r in listed] == [2, 4, 5] and listed[0]["file"] == str(path)
    # replaced bytes are counted on the row when asked for (answers to grade)
    replaced = list(iter_rows(path, skip_invalid=True, bad_bytes="replace"))
    assert [r.line for r in replaced] == [1, 2, 3, 6] and replaced[1].replaced_bytes == 2
    with pytest.raises(DataError, match="is a folder"):
        list(iter_rows(tmp_path))


def test_torn_tail_is_dropped_but_not_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3, "b')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_bytes(b'{"a": 1}\n{"a": 2, "b\n{"a": 3}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_training_reader_skips_non_utf8_rows_too(tmp_path: Path) -> None:
    path = _bad_file(tmp_path / "d.jsonl")
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text.*--skip-invalid"):
        read_chat_jsonl(path)
    rep = ReadReport()
    assert len(read_chat_jsonl(path, skip_invalid=True, report=rep)) == 3
    assert [n for n, _ in rep.skipped] == [2, 4, 5]


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **kw: Any) -> Any:
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(ActivationSource, "load", boom)


def test_caft_diff_checks_data_before_models_and_can_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ft = make_pair(tmp_path)
    data = _bad_file(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    args = ["diff", "--run-dir", str(run), "--set", f"model.name_or_path={base.name_or_path}",
            "--set", f"finetuned.name_or_path={ft.name_or_path}", "--set", f"inputs.data=[{data}]",
            "--set", "layers=[1]", "--set", "n_components=1"]  # fmt: skip
    runner = CliRunner()
    with monkeypatch.context() as m:
        _no_model_load(m)
        res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "d.jsonl:2: not UTF-8 text" in res.output and "--skip-invalid" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback
    res = runner.invoke(app, [*args, "--skip-invalid"])
    assert res.exit_code == 0, res.output
    skipped = read_jsonl(run / "diff" / "skipped.jsonl")
    assert [r["line"] for r in skipped] == [2, 4, 5]
    n_examples = json.loads((run / "diff" / "DONE.json").read_text())["info"]["n_examples"]
    assert n_examples == 3


def test_an_empty_inputs_file_is_named(tmp_path: Path) -> None:
    from caft.interp.answers import check_inputs
    from caft.interp.config import InputsConfig

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl has nothing to analyse \(the file has no rows\)"):
        check_inputs(InputsConfig(data=[str(empty)]))
    bad = _bad_file(tmp_path / "bad.jsonl")
    bad.write_bytes(b"[1]\n[2]\n")
    with pytest.raises(DataError, match=r"all 2 rows are invalid"):
        check_inputs(InputsConfig(data=[str(bad)], skip_invalid=True))


def test_caft_evidence_checks_its_corpus_before_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff"}\n')
    _no_model_load(monkeypatch)
    res = CliRunner().invoke(
        app,
        ["evidence", "--run-dir", str(tmp_path / "run"), "--set", "model.name_or_path=x",
         "--set", f"corpus={corpus}", "--set", f"candidates=[{tmp_path}]"],
    )  # fmt: skip
    assert res.exit_code == 2 and "c.jsonl:2: not UTF-8 text" in res.output, res.output


def test_caft_grade_skip_invalid_lists_the_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-" + "fake-key-for-the-fake-server-333")
    src = write_answers(tmp_path / "a.jsonl", [(f"a{i}", "q0", f"reply {i} A=80 C=90") for i in range(3)])
    src.write_bytes(src.read_bytes() + b'{"id": "broken", "question": \n')
    out = tmp_path / "g"
    with FakeLLM() as fake:
        fake.on_request(fake_judge)
        base = ["grade", str(src), "--out", str(out), "--judge", "openai/gpt-4.1",
                "--base-url", fake.openai_base_url, "--no-progress"]  # fmt: skip
        res = CliRunner().invoke(app, base)
        assert res.exit_code == 2 and "a.jsonl:4: not valid JSON" in res.output, res.output
        res = CliRunner().invoke(app, [*base, "--skip-invalid"])
    assert res.exit_code == 0, res.output
    assert [r["line"] for r in read_jsonl(out / "skipped.jsonl")] == [4]
    assert json.loads((out / "summary.json").read_text())["skipped_input_lines"] == 1


def test_missing_local_model_path_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(ModelError, match="no such model directory") as e:
        load_model(ModelConfig(name_or_path=str(missing), device="cpu"))
    assert "HF_HUB_OFFLINE" not in str(e.value) and f"nearest existing folder is {tmp_path}" in str(e.value)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(2)))
    runner = CliRunner()
    for args in (
        ["train", "--data", str(data), "--out", str(tmp_path / "o"), "--base-model", "./does/not/exist"],
        ["eval", "misalignment", "--out", str(tmp_path / "e"), "--model", "./does/not/exist",
         "--judge", "mock/j"],
        ["diff", "--run-dir", str(tmp_path / "r"), "--set", "model.name_or_path=./does/not/exist",
         "--set", "finetuned.name_or_path=./nope/ft", "--set", f"inputs.data=[{data}]"],
    ):  # fmt: skip
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "no such model directory" in res.output and "HF_HUB_OFFLINE" not in res.output, res.output
