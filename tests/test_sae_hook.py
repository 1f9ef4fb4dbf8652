"""F7: an sae-lens SAE is checked against its own hook name; one trained on another residual is refused."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from caft.errors import SiteError
from caft.interp.sae_load import load_sae_lens_dir, sae_lens_hook_name
from caft.sites import hook_layer


@pytest.mark.parametrize(
    ("hook", "layer"),
    [
        ("blocks.5.hook_resid_post", 5),
        ("blocks.8.hook_resid_pre", 7),
        ("blocks.1.hook_resid_pre", 0),
        ("model.layers.12", 12),
        ("transformer.h.3", 3),
    ],
)
def test_hook_layer_maps_residual_hooks_to_caft_layers(hook: str, layer: int) -> None:
    assert hook_layer(hook) == layer


@pytest.mark.parametrize(
    ("hook", "why"),
    [
        ("blocks.0.hook_resid_pre", "embeddings"),
        ("blocks.3.hook_mlp_out", "not the residual stream after a decoder block"),
        ("blocks.3.hook_resid_mid", "not the residual stream after a decoder block"),
        ("blocks.3.attn.hook_z", "not the residual stream after a decoder block"),
    ],
)
def test_other_hooks_are_refused(hook: str, why: str) -> None:
    with pytest.raises(SiteError, match=why):
        hook_layer(hook)


def _saved_sae(folder: Path, hook: str | None) -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook) if hook is not None else SAEMetadata()
    StandardSAE(StandardSAEConfig(d_in=8, d_sae=16, metadata=meta)).save_model(folder)
    return folder


def test_a_resid_pre_sae_is_refused_at_its_block_index(tmp_path: Path) -> None:
    folder = _saved_sae(tmp_path / "pre8", "blocks.8.hook_resid_pre")
    with pytest.raises(SiteError) as info:
        load_sae_lens_dir(folder, layer=8)
    msg = str(info.value)
    assert "'blocks.8.hook_resid_pre'" in msg and "layer 7" in msg and "set `layer: 7`" in msg
    loaded = load_sae_lens_dir(folder, layer=7)
    assert loaded.layer == 7 and loaded.spec["hook_name"] == "blocks.8.hook_resid_pre"


def test_an_mlp_sae_is_refused_and_an_unnamed_one_is_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SiteError, match="hook_mlp_out"):
        load_sae_lens_dir(_saved_sae(tmp_path / "mlp", "blocks.2.hook_mlp_out"), layer=2)
    with caplog.at_level(logging.DEBUG, logger="caft.interp.sae_load"):
        loaded = load_sae_lens_dir(_saved_sae(tmp_path / "plain", None), layer=2)
    assert "hook_name" not in loaded.spec and "records no hook name" in caplog.text


def test_caft_trained_sae_keeps_its_layer(tmp_path: Path) -> None:
    import json

    folder = _saved_sae(tmp_path / "trained", None)
    (folder / "caft_sae.json").write_text(json.dumps({"input_scale": 2.0, "layer": 1}))
    assert load_sae_lens_dir(folder, layer=1).input_scale == 2.0
    with pytest.raises(SiteError, match="trained by caft on layer 1"):
        load_sae_lens_dir(folder, layer=2)


def test_hook_name_of_older_sae_lens_configs() -> None:
    old = SimpleNamespace(cfg=SimpleNamespace(hook_name="blocks.4.hook_resid_post"))
    new = SimpleNamespace(cfg=SimpleNamespace(metadata=SimpleNamespace(hook_name="blocks.5.hook_resid_pre")))
    assert sae_lens_hook_name(old) == "blocks.4.hook_resid_post"
    assert sae_lens_hook_name(new) == "blocks.5.hook_resid_pre"
    assert sae_lens_hook_name(SimpleNamespace(cfg=SimpleNamespace())) is None
