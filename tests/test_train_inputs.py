"""Bad inputs fail with clear messages before any training starts; --skip-invalid; the `caft train` CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import train_helpers
from train_helpers import CHAT
from train_helpers import jsonl as _jsonl
from train_helpers import train_cfg as _cfg

from caft.errors import ConfigError, DataError, SubspaceError
from caft.subspace import Subspace
from caft.training.config import build_train_config
from caft.training.trainer import train

llama_dir = train_helpers.llama_dir  # the shared fixture


def test_subspace_that_does_not_fit_fails_before_training(tmp_path: Path, llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    wrong_d = Subspace.from_vectors({1: torch.randn(2, 16)}, d_model=16).save(tmp_path / "s16")
    cfg = _cfg(llama_dir, data, ablation={"subspace": str(wrong_d)})
    with pytest.raises(SubspaceError, match=r"d_model=16.*hidden size is 32"):
        train(cfg, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    wrong_layer = Subspace.from_vectors({7: torch.randn(2, 32)}, d_model=32).save(tmp_path / "s7")
    cfg = _cfg(llama_dir, data, ablation={"subspace": str(wrong_layer)})
    with pytest.raises(SubspaceError, match=r"layer 7.*3 layers"):
        train(cfg, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    with pytest.raises(SubspaceError, match="out of range"):
        train(_cfg(llama_dir, data, ablation={"random": "3:2"}), tmp_path / "o3")


def test_bad_inputs_fail_before_the_model_loads(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [CHAT[0], {"messages": [{"role": "user", "content": "q"}]}])
    cfg = _cfg(tmp_path / "no-such-model", data)
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*no assistant turn"):
        train(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="no model"):
        train(build_train_config(None, values={"data": {"path": str(data)}}), tmp_path / "o")
    with pytest.raises(ConfigError, match="no training data"):
        train(_cfg(tmp_path, data, data={"path": None}), tmp_path / "o")


def test_max_length_beyond_model_positions_is_refused(tmp_path: Path, llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    with pytest.raises(ConfigError, match=r"exceeds the model's 512 positions"):
        train(_cfg(llama_dir, data, data={"max_length": 4096}), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_skip_invalid_trains_on_good_rows(tmp_path: Path, llama_dir: Path) -> None:
    rows: list[Any] = [*CHAT[:6], "{oops", {"messages": []}]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = _cfg(llama_dir, data, data={"skip_invalid": True}, optim={"max_steps": 1})
    train(cfg, tmp_path / "o")
    rec = json.loads((tmp_path / "o" / "caft_training.json").read_text())
    assert rec["data"]["train_file"]["skipped"] == 2 and rec["data"]["train_file"]["kept"] == 6
    assert [x["line"] for x in rec["data"]["train_file"]["skipped_lines"]] == [7, 8]


def test_cli_train(tmp_path: Path, llama_dir: Path) -> None:
    from typer.testing import CliRunner

    from caft.app.cli import app

    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    common = ["train", "--base-model", str(llama_dir), "--data", str(data), "--max-steps", "2"]
    sets = ["--set", "lora.r=4", "--set", "lora.target_modules=[q_proj]", "--set", "progress=false"]
    runner = CliRunner()
    out = tmp_path / "o"
    r = runner.invoke(
        app,
        [
            *common,
            "--out",
            str(out),
            "--random-subspace",
            "1:3",
            "--seed",
            "7",
            "--ablation",
            "detached",
            *sets,
        ],
    )
    assert r.exit_code == 0, r.output
    assert (out / "final" / "adapter_config.json").is_file()
    rec = json.loads((out / "caft_training.json").read_text())
    assert rec["ablation"]["mode"] == "detached" and rec["config"]["ablation"]["random_seed"] == 7
    # settings from a YAML run config (train section + model), preset underneath, --set on top
    (tmp_path / "run.yaml").write_text(
        f"model:\n  name_or_path: {llama_dir}\ntrain:\n  data:\n    path: {data}\n  optim:\n    max_steps: 1\n"
        "  lora:\n    r: 2\n    target_modules: [v_proj]\n  progress: false\n"
    )
    out2 = tmp_path / "o2"
    r = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(tmp_path / "run.yaml"),
            "--preset",
            "em",
            "--out",
            str(out2),
            "--random-subspace",
            "0:2",
            "--ablation",
            "steer",
            "--steer-coef",
            "4",
            "--set",
            "optim.lr=0.001",
        ],
    )
    assert r.exit_code == 0, r.output
    rec = json.loads((out2 / "caft_training.json").read_text())
    assert rec["config"]["lora"]["r"] == 2 and rec["config"]["optim"]["lr"] == 0.001
    assert rec["config"]["optim"]["grad_accum"] == 8 and rec["ablation"]["steer_coef"] == 4.0
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "x"), "--ablation", "project", *sets])
    assert r.exit_code == 2 and "needs --subspace" in r.output
    r = runner.invoke(
        app, [*common, "--out", str(tmp_path / "y"), "--ablation", "zero", "--random-subspace", "1:2"]
    )
    assert r.exit_code == 2 and "ablation.mode" in r.output


def test_nan_loss_stops_with_a_clear_error(
    tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from caft.training.objectives import ObjectiveLoss
    from caft.training.trainer import DivergenceError

    real = ObjectiveLoss.loss

    def nan_loss(self: ObjectiveLoss, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return real(self, output, batch) * float("nan")

    monkeypatch.setattr(ObjectiveLoss, "loss", nan_loss)
    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    with pytest.raises(DivergenceError, match=r"loss became nan at step 1; lower optim\.lr"):
        train(_cfg(llama_dir, data), tmp_path / "o")
    assert not (tmp_path / "o" / "final").exists()


def test_empty_subspace_is_plain_finetuning(tmp_path: Path, llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    empty = Subspace(d_model=32, bases={1: torch.zeros(32, 0)})
    res = train(_cfg(llama_dir, data, optim={"max_steps": 1}), tmp_path / "o", subspace=empty)
    rec = json.loads((tmp_path / "o" / "caft_training.json").read_text())
    assert rec["ablation"] is None and rec["subspace_digest"] == empty.digest()
    assert res.final_path.is_dir()
