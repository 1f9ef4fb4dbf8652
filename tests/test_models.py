from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caft.config import ModelConfig
from caft.errors import ModelError
from caft.models import (
    adapter_disabled,
    attach_adapter,
    generate_chat,
    is_peft_model,
    load_model,
    merge_adapter,
)
from caft.testing import save_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny-qwen", arch="qwen2", template="chatml")


def test_load_offline_from_a_local_directory(tiny_dir: Path) -> None:
    lm = load_model(ModelConfig(name_or_path=str(tiny_dir), device="cpu"))
    assert lm.sites.n_layers == 3 and lm.sites.d_model == 32
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert lm.tokenizer.pad_token == "<pad>" and lm.tokenizer.padding_side == "right"
    assert not lm.model.training and not lm.has_adapter


def test_unknown_model_is_a_clear_offline_error() -> None:
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=1 is set, so only local directories"):
        load_model(ModelConfig(name_or_path="nobody/no-such-model-xyz", device="cpu"))


def test_pad_token_falls_back_to_eos() -> None:
    from caft.models import prepare_tokenizer

    tok = tiny_tokenizer("chatml")
    tok.pad_token = None
    prepare_tokenizer(tok, "left")
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"


def test_adapter_load_toggle_and_merge(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = load_model(ModelConfig(name_or_path=str(tiny_dir), device="cpu"))
    peft_model = get_peft_model(
        base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")

    lm = load_model(ModelConfig(name_or_path=str(tiny_dir), adapter=str(tmp_path / "adapter"), device="cpu"))
    plain = load_model(ModelConfig(name_or_path=str(tiny_dir), device="cpu"))
    assert is_peft_model(lm.model) and lm.has_adapter
    ids = torch.randint(5, 300, (2, 7))
    with torch.no_grad():
        with_adapter = lm.model(ids).logits
        with adapter_disabled(lm.model):
            without = lm.model(ids).logits
        reference = plain.model(ids).logits
    assert torch.allclose(without, reference, atol=1e-5)
    assert not torch.allclose(with_adapter, reference, atol=1e-3)
    merged = merge_adapter(lm.model)
    assert not is_peft_model(merged)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter, atol=1e-4)
    with pytest.raises(ModelError, match="not a peft adapter directory"):
        attach_adapter(plain.model, tiny_dir)


def test_generate_chat_is_seeded_and_greedy_is_deterministic(tiny_dir: Path) -> None:
    lm = load_model(ModelConfig(name_or_path=str(tiny_dir), device="cpu"))
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "write some code please"}]]
    a = generate_chat(lm, convs, max_new_tokens=6, seed=3, batch_size=2)
    b = generate_chat(lm, convs, max_new_tokens=6, seed=3, batch_size=2)
    c = generate_chat(lm, convs, max_new_tokens=6, seed=4, batch_size=2)
    assert len(a) == 2 and a == b and a != c
    # Greedy: left padding in a batch does not change what each prompt produces.
    batched = generate_chat(lm, convs, max_new_tokens=6, temperature=0, batch_size=2)
    single = [generate_chat(lm, [c_], max_new_tokens=6, temperature=0)[0] for c_ in convs]
    assert batched == single
    assert lm.tokenizer.padding_side == "right"  # restored


def test_real_minilm_loads_offline(minilm_dir: Path) -> None:
    lm = load_model(ModelConfig(name_or_path=str(minilm_dir), kind="encoder", device="cpu"))
    assert (lm.sites.n_layers, lm.sites.d_model, lm.sites.is_causal_lm) == (6, 384, False)
    batch = lm.tokenizer(["the food was great", "a dull tennis match"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = lm.model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    emb = torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (2, 384)
    assert 0.0 < float(emb[0] @ emb[1]) < 0.9  # a real embedding: related but different sentences
