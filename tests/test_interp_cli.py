"""`caft diff` / `caft sae rank` / `caft evidence` through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from interp_helpers import chat_rows, make_pair, write_jsonl
from typer.testing import CliRunner

from caft.app.cli import app, main
from caft.interp.schema import load_candidates


def test_diff_and_evidence_commands_with_overrides(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    run = tmp_path / "run"
    models = [
        "--set",
        f"model.name_or_path={base.name_or_path}",
        "--set",
        f"finetuned.name_or_path={ft.name_or_path}",
    ]
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["diff", "--run-dir", str(run), *models, "--set", f"inputs.data=[{data}]", "--set", "layers=[1]",
         "--set", "n_components=3"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "n_candidates: 4" in res.output
    assert [c.id for c in load_candidates(run / "diff")][:3] == ["pc:L1:0", "pc:L1:1", "pc:L1:2"]

    res = runner.invoke(app, ["evidence", "--run-dir", str(run), *models, "--set", "steering.enabled=false",
                              "--set", "top_k=2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (run / "evidence" / "dossiers").iterdir())
    assert files == ["pc_L1_0.json", "pc_L1_1.json", "pc_L1_2.json", "vec_L1_mean.json"]
    d = json.loads((run / "evidence" / "dossiers" / "pc_L1_0.json").read_text())
    assert len(d["max_examples"]) == 2 and d["steering"] is None and d["logit_lens"] is not None


def test_run_config_shaped_yaml(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(6))
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "model": {"name_or_path": base.name_or_path},
        "finetuned": {"name_or_path": ft.name_or_path},
        "diff": {"inputs": {"data": [str(data)]}, "layers": [2], "n_components": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["diff", str(path), "--set", "diff.n_components=1"])
    assert res.exit_code == 0, res.output
    assert [c.id for c in load_candidates(tmp_path / "run" / "diff")] == ["pc:L2:0", "vec:L2:mean"]


def test_cli_errors_are_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["diff", "--set", "layers=[1]"])
    assert exc.value.code == 2
    assert "no run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["diff", "--run-dir", str(tmp_path), "--set", "n_components=0"])
    assert "n_components" in capsys.readouterr().err


def test_sae_train_and_rank_commands(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    run = tmp_path / "run"
    models = [
        "--set",
        f"model.name_or_path={base.name_or_path}",
        "--set",
        f"finetuned.name_or_path={ft.name_or_path}",
    ]
    runner = CliRunner()
    res = runner.invoke(app, ["diff", "--run-dir", str(run), *models, "--set", f"inputs.data=[{data}]"])
    assert res.exit_code == 0, res.output
    small = [
        "--set",
        "train.training_tokens=512",
        "--set",
        "train.batch_size=64",
        "--set",
        "train.expansion=2",
    ]
    out = tmp_path / "sae_l1"
    res = runner.invoke(
        app, ["sae", "train", "--layer", "1", "--out", str(out), "--run-dir", str(run), *models, *small]
    )
    assert res.exit_code == 0, res.output
    assert (out / "cfg.json").is_file() and (out / "caft_sae.json").is_file()
    res = runner.invoke(
        app,
        ["sae", "rank", "--run-dir", str(run), *models, "--set", "top_n=3",
         "--set", f"saes=[{{layer: 1, source: sae_lens_dir, path: {out}, name: mine}}]"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    cands = load_candidates(run / "sae")
    assert cands and {c.sae for c in cands} == {"mine"} and all(c.layer == 1 for c in cands)
