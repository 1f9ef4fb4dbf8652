"""Bad inputs fail with clear messages before any training starts; --skip-invalid; the `caft train` CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from caft.training.config import TrainConfig, build_train_config
from caft.training.trainer import train

from caft.errors import ConfigError, DataError, SubspaceError
from caft.subspace import Subspace
from caft.testing import save_tiny

CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"The answer is {2 * i}, my friend."},
        ]
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("m") / "llama", "llama", hidden=32, layers=3)


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(model_dir: Path, data_file: Path, **values: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "model": {"name_or_path": str(model_dir), "device": "cpu"},
        "data": {"path": str(data_file)},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "optim": {"lr": 1e-2, "batch_size": 4, "grad_accum": 1, "max_steps": 3, "warmup_steps": 1},
        "progress": False,
    }
    for k, v in values.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return build_train_config("em", values=base)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


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

    from caft.cli import app

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
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "x"), "--ablation", "project", *sets])
    assert r.exit_code == 2 and "needs --subspace" in r.output
    r = runner.invoke(
        app, [*common, "--out", str(tmp_path / "y"), "--ablation", "zero", "--random-subspace", "1:2"]
    )
    assert r.exit_code == 2 and "ablation.mode" in r.output


def test_nan_loss_stops_with_a_clear_error(
    tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from caft.training.objectives import Task
    from caft.training.trainer import DivergenceError

    real = Task.loss

    def nan_loss(self: Task, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return real(self, output, batch) * float("nan")

    monkeypatch.setattr(Task, "loss", nan_loss)
    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    with pytest.raises(DivergenceError, match=r"loss became nan at step 1; lower optim\.lr"):
        train(_cfg(llama_dir, data), tmp_path / "o")
    assert not (tmp_path / "o" / "final").exists()
