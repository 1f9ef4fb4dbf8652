"""Data-parallel training (caft.training.distributed) on CPU with two gloo ranks started by torchrun: the same
losses and final weights as one process with the same global batch, with and without CAFT; a kill -9 of one
rank mid-run, then a resume from the newest checkpoint, ends with the same weights."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import train_helpers
from dist_helpers import adapter, close, finish, launch, losses, steps
from train_helpers import CHAT, jsonl, train_cfg

from caft.training.trainer import train

llama_dir = train_helpers.llama_dir


def test_two_ranks_equal_one_process_and_resume_after_kill_9(tmp_path: Path, llama_dir: Path) -> None:
    data = jsonl(tmp_path / "d.jsonl", CHAT)
    # 4 examples per micro-batch, 2 micro-batches per step: each rank takes 2 of every 4 (unequal lengths)
    optim = {"batch_size": 4, "grad_accum": 2, "max_steps": 3}
    plain = train_cfg(llama_dir, data, optim=optim)
    caft = train_cfg(llama_dir, data, optim=optim, ablation={"random": "1:4", "mode": "project"})
    killed = train_cfg(
        llama_dir, data, optim={**optim, "max_steps": 6}, ablation={"random": "1:4", "mode": "project"},
        save_every=1,
    )  # fmt: skip
    pids = tmp_path / "pids"
    pids.mkdir()
    runs = [{"cfg": c.model_dump(mode="json"), "out": str(tmp_path / name)} for c, name in
            [(plain, "ddp_plain"), (caft, "ddp_caft"), (killed, "ddp_killed")]]  # fmt: skip
    first = [*runs[:2], {**runs[2], "slow_s": 0.5}]
    proc = launch({"runs": first, "pid_dir": str(pids)}, tmp_path / "spec1.json")
    try:
        # the third run is slowed once the first two are done, so that rank 1 can be killed mid-run
        ckpt = tmp_path / "ddp_killed" / "checkpoints" / "step-000002"
        deadline = time.monotonic() + 240
        while not ckpt.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, finish(proc)[-3000:]
        os.kill(int((pids / "rank-1").read_text()), signal.SIGKILL)
        out = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and not (tmp_path / "ddp_killed" / "final").exists(), out[-3000:]

    # one process, same global batch
    for cfg, name in [(plain, "one_plain"), (caft, "one_caft"), (killed, "one_killed")]:
        train(cfg, tmp_path / name)
    for name in ("plain", "caft"):
        assert losses(tmp_path / f"ddp_{name}") == pytest.approx(losses(tmp_path / f"one_{name}"), rel=1e-4)
        assert close(adapter(tmp_path / f"ddp_{name}"), adapter(tmp_path / f"one_{name}")), name
    # the ablation ran on both ranks: CAFT's weights are not the plain ones
    assert not close(adapter(tmp_path / "ddp_caft"), adapter(tmp_path / "ddp_plain"))

    resume = [{**runs[2], "resume": True}]
    proc = launch({"runs": resume, "pid_dir": str(pids)}, tmp_path / "spec2.json")
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert steps(tmp_path / "ddp_killed") == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "ddp_killed") == pytest.approx(losses(tmp_path / "one_killed"), rel=1e-4)
    assert close(adapter(tmp_path / "ddp_killed"), adapter(tmp_path / "one_killed"))
    # the saved output is the plain peft adapter, with caft's record next to it
    final = tmp_path / "ddp_killed" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "caft_training.json").is_file()
    assert json.loads((final / "caft_training.json").read_text())["output"] == "peft_adapter"


def test_caft_run_refuses_to_run_once_per_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from caft.app.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as info:
        main(["run", str(tmp_path / "run.yaml")])
    assert info.value.code == 2 and "--set launch.processes=N" in capsys.readouterr().err
