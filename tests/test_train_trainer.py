"""The trainer end to end on tiny models: LoRA touches only adapters, saved outputs reload with plain
transformers/peft and reproduce the trained logits, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import train_helpers
from train_helpers import CHAT
from train_helpers import jsonl as _jsonl
from train_helpers import logits as _logits
from train_helpers import train_cfg as _cfg

from caft.errors import RunDirError
from caft.subspace import Subspace
from caft.training.trainer import train

llama_dir = train_helpers.llama_dir  # the shared fixture


def test_lora_changes_only_adapters_and_adapter_reloads(tmp_path: Path, llama_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    cfg = _cfg(llama_dir, data, ablation={"random": "1:4", "mode": "project"})
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    res = train(cfg, tmp_path / "out")
    trained = res.model
    changed = {
        n: not torch.equal(p.detach(), before[n.replace("base_model.model.", "").replace(".base_layer", "")])
        for n, p in trained.named_parameters()
        if "lora_" not in n
    }
    assert changed and not any(changed.values())  # base weights untouched
    lora = {n: p for n, p in trained.named_parameters() if "lora_B" in n}
    assert lora and all(p.abs().sum() > 0 for p in lora.values())  # B starts at zero; it moved
    # no hooks left anywhere on the trained model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in trained.modules())
    # reload with plain transformers + peft: same logits as the trained model, no ablation
    final = res.final_path
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), final)
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(fresh, ids), _logits(trained, ids), atol=1e-5)
    assert not torch.allclose(_logits(fresh, ids), _logits(base, ids), atol=1e-4)
    rec = json.loads((tmp_path / "out" / "caft_training.json").read_text())
    sub = Subspace.load(tmp_path / "out" / "subspace")
    assert rec["ablation"]["mode"] == "project" and rec["subspace_digest"] == sub.digest()
    assert rec["output"] == "peft_adapter" and (final / "caft_training.json").is_file()
    log = [json.loads(x) for x in res.log_path.read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "step"] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 and "lr" in r for r in log if r["event"] == "step")


def test_full_finetune_reloads_with_transformers(tmp_path: Path, llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    cfg = _cfg(
        llama_dir,
        data,
        method="full",
        freeze_embeddings=True,
        ablation={"random": "0:3,2:2", "mode": "mean", "mean_batches": 2},
        optim={"lr": 1e-3},
    )
    res = train(cfg, tmp_path / "out")
    fresh = AutoModelForCausalLM.from_pretrained(res.final_path)
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(_logits(fresh, ids), _logits(res.model, ids), atol=1e-5)
    assert torch.equal(fresh.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(fresh.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)
    means = tmp_path / "out" / "ablation_means.safetensors"
    assert means.is_file()
    rec = json.loads((tmp_path / "out" / "caft_training.json").read_text())
    assert rec["output"] == "full_model" and rec["ablation"]["means_file"] == means.name


@pytest.mark.parametrize("mode", ["project", "gradient"])
def test_resume_equals_uninterrupted(tmp_path: Path, llama_dir: Path, mode: str) -> None:
    from safetensors.torch import load_file

    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    cfg = _cfg(
        llama_dir,
        data,
        lora={"dropout": 0.1},  # dropout draws random numbers: the RNG state must be restored too
        optim={"max_steps": 5, "batch_size": 3, "grad_accum": 2},  # 4 micro-batches/epoch: crosses epochs
        ablation={"random": "1:4", "mode": mode},
        save_every=2,
    )
    full = train(cfg, tmp_path / "a")
    part = train(cfg, tmp_path / "b", stop_after_steps=3)
    assert not (tmp_path / "b" / "final").exists()
    with pytest.raises(RunDirError, match="--resume"):
        train(cfg, tmp_path / "b")
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert part.metrics["step"] == 3 and resumed.metrics["step"] == 5
    wa = load_file(str(full.final_path / "adapter_model.safetensors"))
    wb = load_file(str(resumed.final_path / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    def losses(path: Path) -> list[tuple[int, float]]:
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["event"] == "step"]

    assert losses(full.log_path) == losses(resumed.log_path)
    assert [s for s, _ in losses(resumed.log_path)] == [1, 2, 3, 4, 5]
    # a finished run is not retrained
    again = train(cfg, tmp_path / "b", resume=True)
    assert again.metrics == json.loads((tmp_path / "b" / "caft_training.json").read_text())["metrics"]


def test_resume_refuses_changed_settings(tmp_path: Path, llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    cfg = _cfg(llama_dir, data, optim={"max_steps": 4})
    train(cfg, tmp_path / "o", stop_after_steps=2)
    other = _cfg(llama_dir, data, optim={"max_steps": 4, "lr": 5e-3})
    with pytest.raises(RunDirError, match="different configuration"):
        train(other, tmp_path / "o", resume=True)


@pytest.mark.gpu
def test_gpu_bf16_caft_run_reloads(tmp_path: Path, llama_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    cfg = _cfg(
        llama_dir,
        data,
        model={"device": "cuda", "dtype": "bfloat16"},
        optim={"precision": "bf16"},
        ablation={"random": "1:4", "mode": "project"},
    )
    res = train(cfg, tmp_path / "o")
    assert res.metrics["loss"] == res.metrics["loss"]  # not NaN
    fresh = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).cuda(), res.final_path
    )
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    assert torch.allclose(_logits(fresh, ids).float(), _logits(res.model, ids).float(), atol=1e-2)
