"""Sharded training (FSDP2, caft.training.sharded) on CPU with two gloo ranks started by torchrun with the
launcher's FSDP setting: the same losses and final weights as one process with the same global batch (LoRA
with and without CAFT, LoRA + CAFT under gradient checkpointing, full fine-tuning with CAFT); checkpoints in
the one-process format, so that an FSDP run resumes from its own checkpoint, one process resumes from an
FSDP checkpoint, and an FSDP run resumes from a one-process checkpoint, all ending with the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import train_helpers
from dist_helpers import FSDP_ENV, adapter, close, finish, full_model, launch, losses, steps
from safetensors.torch import load_file
from train_helpers import CHAT, jsonl, train_cfg

from caft.errors import ConfigError
from caft.training.checkpoint import PARAMS_FILE
from caft.training.distributed import setup
from caft.training.trainer import train

llama_dir = train_helpers.llama_dir
CAFT = {"random": "1:4", "mode": "project"}
# full fine-tuning: AdamW turns the float-order differences of a few near-zero gradients into a visible part
# of one step (lr 1e-2); measured here up to 5e-6
FULL_ATOL = 2e-5
OPTIM_ATOL = 1e-7  # AdamW's moments (measured up to 1e-8)


def checkpoint(out: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = out / "checkpoints" / f"step-{step:06d}"
    return load_file(str(path / PARAMS_FILE)), torch.load(path / "optimizer.pt", weights_only=True)


def test_fsdp_two_ranks_equal_one_process_and_resume_across_modes(tmp_path: Path, llama_dir: Path) -> None:
    data = jsonl(tmp_path / "d.jsonl", CHAT)
    # 4 examples per micro-batch, 2 micro-batches per step: each rank takes 2 of every 4 (unequal lengths)
    optim = {"batch_size": 4, "grad_accum": 2, "max_steps": 3}
    cfgs = {
        "lora_plain": train_cfg(llama_dir, data, optim=optim),
        "lora_caft": train_cfg(llama_dir, data, optim=optim, ablation=CAFT),
        "lora_caft_gc": train_cfg(
            llama_dir, data, optim={**optim, "gradient_checkpointing": True}, ablation=CAFT
        ),
        "full_caft": train_cfg(
            llama_dir, data, optim={**optim, "max_steps": 4}, method="full", ablation=CAFT
        ),
    }
    runs = [{"cfg": c.model_dump(mode="json"), "out": str(tmp_path / f"fsdp_{n}")} for n, c in cfgs.items()]
    full = runs[-1]["cfg"]
    # stopped after step 2 with a checkpoint, resumed below
    runs.append({"cfg": full, "out": str(tmp_path / "fsdp_stopped"), "stop_after": 2})
    proc = launch({"runs": runs}, tmp_path / "spec1.json", env=FSDP_ENV)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]

    # one process, same global batch (the GC run is compared with the plain-forward one)
    for name in ("lora_plain", "lora_caft", "full_caft"):
        train(cfgs[name], tmp_path / f"one_{name}")
    for name, ref in [
        ("lora_plain", "lora_plain"),
        ("lora_caft", "lora_caft"),
        ("lora_caft_gc", "lora_caft"),
    ]:
        assert losses(tmp_path / f"fsdp_{name}") == pytest.approx(losses(tmp_path / f"one_{ref}"), rel=1e-5)
        assert close(adapter(tmp_path / f"fsdp_{name}"), adapter(tmp_path / f"one_{ref}")), name
    assert losses(tmp_path / "fsdp_full_caft") == pytest.approx(losses(tmp_path / "one_full_caft"), rel=1e-5)
    assert close(full_model(tmp_path / "fsdp_full_caft"), full_model(tmp_path / "one_full_caft"), FULL_ATOL)
    # the ablation ran on both ranks: CAFT's weights are not the plain ones
    assert not close(adapter(tmp_path / "fsdp_lora_caft"), adapter(tmp_path / "fsdp_lora_plain"))
    # final/ is the one-process output: the same files, the same peft adapter config
    for name in ("lora_caft", "full_caft"):
        fsdp_final, one_final = tmp_path / f"fsdp_{name}" / "final", tmp_path / f"one_{name}" / "final"
        assert sorted(p.name for p in fsdp_final.iterdir()) == sorted(p.name for p in one_final.iterdir())
    configs = [
        json.loads((tmp_path / d / "final/adapter_config.json").read_text())
        for d in ("fsdp_lora_caft", "one_lora_caft")
    ]
    for c in configs:  # a set in peft, written in the process's hash order
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]

    # the FSDP checkpoint is a one-process checkpoint: same names, shapes and optimizer layout
    train(cfgs["full_caft"], tmp_path / "one_stopped", stop_after_steps=2)
    (p_fsdp, o_fsdp), (p_one, o_one) = (
        checkpoint(tmp_path / "fsdp_stopped", 2),
        checkpoint(tmp_path / "one_stopped", 2),
    )
    assert close(p_fsdp, p_one, FULL_ATOL)
    assert o_fsdp["param_groups"] == o_one["param_groups"]
    assert o_fsdp["state"].keys() == o_one["state"].keys()
    for i, st in o_one["state"].items():
        assert close(o_fsdp["state"][i], st, OPTIM_ATOL), i

    # one process resumes the FSDP checkpoint
    shutil.copytree(tmp_path / "fsdp_stopped", tmp_path / "one_from_fsdp")
    train(cfgs["full_caft"], tmp_path / "one_from_fsdp", resume=True)
    # FSDP resumes its own checkpoint and the one-process one
    resume = [
        {"cfg": full, "out": str(tmp_path / d), "resume": True} for d in ("fsdp_stopped", "one_stopped")
    ]
    proc = launch({"runs": resume}, tmp_path / "spec2.json", env=FSDP_ENV)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    for d in ("one_from_fsdp", "fsdp_stopped", "one_stopped"):
        assert steps(tmp_path / d) == [1, 2, 3, 4], d
        assert losses(tmp_path / d) == pytest.approx(losses(tmp_path / "one_full_caft"), rel=1e-5), d
        assert close(full_model(tmp_path / d), full_model(tmp_path / "one_full_caft"), FULL_ATOL), d
    assert (
        json.loads((tmp_path / "fsdp_stopped/final/caft_training.json").read_text())["output"] == "full_model"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "--fsdp_version 2"),
    ],
)
def test_deepspeed_and_fsdp1_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        setup("cpu")
