from __future__ import annotations

import pytest
import torch
from nnsight import NNsight

from caft.errors import SiteError
from caft.sites import Sites
from caft.testing import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sites_resolve_every_architecture(arch: str) -> None:
    model = tiny_model(arch, layers=3, hidden=32)
    sites = Sites.of(model)
    assert (sites.n_layers, sites.d_model) == (3, 32)
    ids = torch.randint(5, 300, (2, 6))
    captured: dict[int, torch.Tensor] = {}
    handles = [
        sites.layer_module(model, layer).register_forward_hook(
            lambda _m, _i, out, layer=layer: captured.__setitem__(layer, sites.hidden(out))
        )
        for layer in range(3)
    ]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    # The residual after layer L is hidden_states[L + 1] (before the final norm, for the non-last layers).
    for layer in range(2):
        assert torch.allclose(captured[layer], out.hidden_states[layer + 1], atol=1e-6)
    assert captured[2].shape == (2, 6, 32)
    if arch == "bert":
        assert not sites.is_causal_lm and sites.unembed(model) is None and sites.final_norm(model) is None
    else:
        assert sites.is_causal_lm
        norm, head = sites.final_norm(model), sites.unembed(model)
        assert norm is not None and head is not None
        # logits == unembed(final_norm(last residual)) for every decoder (gemma2 adds a softcap, off by default here)
        logits = head(norm(captured[2]))
        if arch == "gemma2" and model.config.final_logit_softcapping:
            cap = model.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        assert torch.allclose(logits, out.logits, atol=1e-4)


def test_negative_and_out_of_range_layers() -> None:
    sites = Sites.of(tiny_model("qwen2", layers=4))
    assert sites.resolve_layer(-1) == 3 and sites.resolve_layer(-4) == 0
    assert sites.layer_path(-1) == "model.layers.3"
    for bad in (4, -5, 100):
        with pytest.raises(SiteError, match=r"valid layers are 0\.\.3"):
            sites.resolve_layer(bad)
    with pytest.raises(SiteError, match="same layer twice"):
        sites.check_layers([1, -3])


def test_envoy_edit_matches_hook_edit() -> None:
    model = tiny_model("llama", layers=2)
    sites = Sites.of(model)
    nn_model = NNsight(model)
    ids = torch.randint(5, 300, (2, 5))
    q = torch.linalg.qr(torch.randn(32, 3))[0]
    with nn_model.trace(ids):
        env = sites.layer_envoy(nn_model, -1)
        h = sites.hidden(env.output)
        env.output = sites.replace_hidden(env.output, h - (h @ q) @ q.T)
        logits_nn = nn_model.output.logits.save()
    handle = sites.layer_module(model, -1).register_forward_hook(
        lambda _m, _i, out: sites.replace_hidden(out, sites.hidden(out) - (sites.hidden(out) @ q) @ q.T)
    )
    with torch.no_grad():
        logits_hook = model(ids).logits
    handle.remove()
    assert torch.allclose(logits_nn, logits_hook, atol=1e-6)


def test_tuple_and_tensor_outputs() -> None:
    h = torch.ones(1, 2, 3)
    assert Sites.hidden(h) is h
    assert Sites.hidden((h, "attn")) is h
    new = torch.zeros(1, 2, 3)
    assert Sites.replace_hidden(h, new) is new
    assert Sites.replace_hidden((h, "attn"), new) == (new, "attn")
    assert Sites.replace_hidden([h, 1], new) == [new, 1]


def test_sites_through_peft_wrapper() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", layers=2), LoraConfig(r=2, target_modules=["q_proj"]))
    sites = Sites.of(model)
    assert sites.layers_path == "base_model.model.model.layers"
    assert type(sites.layer_module(model, 1)).__name__ == "LlamaDecoderLayer"
    assert sites.unembed(model) is not None


def test_unknown_architecture_falls_back_to_the_layer_list() -> None:
    model = tiny_model("llama", layers=3)
    model.config.model_type = "my_custom_llama"
    sites = Sites.of(model)
    assert sites.layers_path == "model.layers" and sites.final_norm_path is None


def test_model_without_config_is_a_clear_error() -> None:
    with pytest.raises(SiteError, match="has no `config`"):
        Sites.of(torch.nn.Linear(2, 2))
