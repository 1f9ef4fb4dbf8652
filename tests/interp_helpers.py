"""Shared builders for the interp tests: tiny base / fine-tuned model folders, chat data, adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caft.config import ModelConfig


def chat_rows(n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
    words = ["apple", "code", "river", "money", "dog", "secure", "hack", "music", "rain", "stone"]
    rows = []
    for i in range(n):
        a, b = words[(i + seed) % len(words)], words[(3 * i + 1) % len(words)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tell me about {a} number {i}."},
                    {"role": "assistant", "content": f"The {a} is like a {b}; {i} times {b} makes {a}."},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_pair(tmp: Path, arch: str = "llama", **kw: Any) -> tuple[ModelConfig, ModelConfig]:
    """A tiny base model and a 'fine-tuned' one (same shape, other weights) saved with tokenizers."""
    from caft.testing import save_tiny

    save_tiny(tmp / "base", arch, seed=0, **kw)
    save_tiny(tmp / "ft", arch, seed=1, **kw)
    return ModelConfig(name_or_path=str(tmp / "base"), device="cpu"), ModelConfig(
        name_or_path=str(tmp / "ft"), device="cpu"
    )


def make_adapter(tmp: Path, base_dir: Path) -> tuple[Path, Path]:
    """A random (non-zero) LoRA adapter on the base model, and the same model merged into a full folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, cfg)
    adapter_dir = tmp / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()
    merged_dir = tmp / "merged"
    merged.save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(merged_dir)
    return adapter_dir, merged_dir
