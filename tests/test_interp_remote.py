"""NDIF remote execution (`remote: true`): the pre-flight errors, the remote flag reaching nnsight's trace call
(the trace then runs locally, so its activations can be compared with caft's own hook capture), and a real
NDIF call when a key is present (`api` tier)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from caft.config import ModelConfig
from caft.errors import ConfigError, ModelError
from caft.interp.inputs import TokenBatch
from caft.interp.remote import KEY_ENV, RemoteModel, preflight
from caft.interp.source import ActivationSource, capture_layers
from caft.models import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from caft.testing import save_tiny

    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama", template="chatml")


def batch() -> TokenBatch:
    ids = torch.randint(5, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return TokenBatch(0, ids, mask, mask.bool(), ["d0", "d1"])


def test_preflight_needs_the_key_no_adapter_and_a_hosted_model(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ModelConfig(name_or_path="meta-llama/Llama-3.1-70B", remote=True)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"export {KEY_ENV}="):
        ActivationSource.load(cfg)  # fails before anything is loaded or sent
    monkeypatch.setenv(KEY_ENV, "ndif-" + "test-key-not-real")
    with pytest.raises(ConfigError, match="adapter"):
        preflight(cfg.model_copy(update={"adapter": "some/adapter"}))
    import nnsight

    monkeypatch.setattr(nnsight, "is_model_running", lambda *a, **k: False)
    with pytest.raises(ModelError, match="not served by NDIF") as info:
        preflight(cfg)
    assert "ndif-test-key" not in str(info.value)


def test_remote_flag_reaches_the_nnsight_trace(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nnsight

    monkeypatch.setenv(KEY_ENV, "ndif-" + "test-key-not-real")
    monkeypatch.setattr(nnsight, "is_model_running", lambda *a, **k: True)
    seen: list[Any] = []
    cls = type(RemoteModel(ModelConfig(name_or_path=str(tiny)), remote=False).nn_model)
    trace = cls.trace

    def spy(self: Any, *args: Any, remote: bool = False, **kwargs: Any) -> Any:
        seen.append(remote)
        return trace(self, *args, **kwargs)  # run here instead of on NDIF

    monkeypatch.setattr(cls, "trace", spy)
    source = ActivationSource.load(ModelConfig(name_or_path=str(tiny), remote=True))
    assert set(source.remote) == {"base"} and source.sites.n_layers == 3 and source.sites.d_model == 32
    out = source.hidden("base", batch(), [0, 2])
    assert seen == [True]
    local = load_model(ModelConfig(name_or_path=str(tiny), device="cpu", dtype="float32"))
    b = batch()
    ref = capture_layers(local.model, local.sites, [0, 2], b.input_ids, b.attention_mask, stop_early=False)
    for layer in (0, 2):
        assert out[layer].shape == (2, 7, 32) and torch.allclose(out[layer], ref[layer], atol=1e-6)


@pytest.mark.api
def test_ndif_returns_activations_of_a_hosted_model() -> None:
    if not os.environ.get(KEY_ENV):
        pytest.skip(f"{KEY_ENV} is not set")
    cfg = ModelConfig(name_or_path=os.environ.get("CAFT_NDIF_MODEL", "openai-community/gpt2"), remote=True)
    preflight(cfg)
    rm = RemoteModel(cfg)
    ids = rm.tokenizer(
        ["The Eiffel Tower is in", "Paris is the capital of"], return_tensors="pt", padding=True
    )
    out = rm.hidden(ids["input_ids"], ids["attention_mask"], [0, rm.sites.n_layers - 1])
    for h in out.values():
        assert h.shape[:2] == ids["input_ids"].shape and h.shape[2] == rm.sites.d_model
        assert bool(h.isfinite().all()) and float(h.abs().sum()) > 0
