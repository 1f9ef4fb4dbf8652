"""Ablation modes: nnsight-vs-hook parity (loss and parameter gradients) and per-mode invariants."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch

from caft.errors import SubspaceError
from caft.sites import Sites
from caft.subspace import Subspace
from caft.testing import tiny_model
from caft.training.ablation import (
    MODES,
    AblationMode,
    ablated,
    compute_subspace_means,
    make_ablation,
    parse_layer_spec,
    random_subspace,
)
from caft.training.forward import ablated_forward, wrap

D, LAYERS = 32, 3
# The modes that edit activations or gradients; `penalty` edits nothing (tests/test_train_penalty.py).
EDIT_MODES = [m for m in MODES if m != "penalty"]


def _subspace(seed: int = 1) -> Subspace:
    g = torch.Generator().manual_seed(seed)
    return Subspace.from_vectors(
        {0: torch.randn(3, D, generator=g), 2: torch.randn(2, D, generator=g)}, d_model=D
    )


def _means(_sub: Subspace) -> dict[int, torch.Tensor]:
    return {0: torch.tensor([0.5, -1.0, 2.0]), 2: torch.full((D,), 0.3)}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(seed))


def _lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )


def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _hand_hook_loss(model: Any, ids: torch.Tensor, sub: Subspace) -> torch.Tensor:
    """CAFT as a hand-written torch forward hook (the reference implementation)."""
    sites = Sites.of(model)
    handles = []
    for L in sub.layers:
        Q = sub.bases[L]

        def hook(_m: Any, _i: Any, out: torch.Tensor, Q: torch.Tensor = Q) -> torch.Tensor:
            return out - (out @ Q) @ Q.T

        handles.append(sites.layer_module(model, L).register_forward_hook(hook))
    try:
        loss: torch.Tensor = model(input_ids=ids, labels=ids).loss
    finally:
        for h in handles:
            h.remove()
    return loss


@pytest.mark.parametrize("lora", [False, True])
def test_nnsight_project_matches_hand_written_hook(lora: bool) -> None:
    model = tiny_model("llama", hidden=D, layers=LAYERS)
    model.train()
    if lora:
        model = _lora(model)
    sub, ids = _subspace(), _ids()
    abl = make_ablation("project", sub)
    out = ablated_forward(wrap(model), Sites.of(model), abl, {"input_ids": ids, "labels": ids})
    out.loss.backward()
    g_nn = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = _hand_hook_loss(model, ids, sub)
    ref.backward()
    g_ref = _grads(model)
    plain = model(input_ids=ids, labels=ids).loss
    assert torch.allclose(out.loss, ref, atol=1e-6, rtol=0)
    assert abs(out.loss.item() - plain.item()) > 1e-4  # the ablation did something
    assert g_nn.keys() == g_ref.keys() and g_nn
    if lora:
        assert all("lora_" in n for n in g_nn)
    for n in g_ref:
        assert torch.allclose(g_nn[n], g_ref[n], atol=1e-6, rtol=1e-5), n
    # no hooks left behind by either path
    assert all(not Sites.of(model).layer_module(model, L)._forward_hooks for L in range(LAYERS))


def _layer_io(mode: AblationMode | None, sub: Subspace) -> dict[str, Any]:
    """Run a tiny model with `mode` via ablated(); return, at layer 0, the raw layer output h and its
    gradient dh, the ablated output x (what layer 1 receives) and its gradient dx, and parameter grads."""
    model = tiny_model("llama", hidden=D, layers=LAYERS)
    model.train()
    sites = Sites.of(model)
    abl = make_ablation(mode, sub, means=_means(sub), steer_coef=2.5) if mode else None
    seen: dict[str, Any] = {}

    def grab(_m: Any, _i: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        seen["h"] = out

    def grab_next(_m: Any, args: tuple[Any, ...]) -> None:
        args[0].retain_grad()
        seen["x"] = args[0]

    # registered before the ablation hook, so it sees the raw layer output
    handle = sites.layer_module(model, 0).register_forward_hook(grab)
    nxt = sites.layer_module(model, 1).register_forward_pre_hook(grab_next)
    ids = _ids()
    try:
        with ablated(model, abl):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        handle.remove()
        nxt.remove()
    return {
        "h": seen["h"].detach(),
        "dh": seen["h"].grad,
        "x": seen["x"].detach(),
        "dx": seen["x"].grad,
        "grads": _grads(model),
    }


def _proj(g: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    return g - (g @ Q) @ Q.T


def test_mode_invariants() -> None:
    # one site (layer 0), so downstream gradients differ only through it
    full = _subspace()
    sub = Subspace(d_model=D, bases={0: full.bases[0]})
    Q = sub.bases[0]
    none, proj = _layer_io(None, sub), _layer_io("project", sub)
    det, grad = _layer_io("detached", sub), _layer_io("gradient", sub)
    mean, steer = _layer_io("mean", sub), _layer_io("steer", sub)
    tol = 1e-5
    # layer 0 is the first site, so every mode sees the same raw activation there
    for run in (proj, det, grad, mean, steer):
        assert torch.allclose(run["h"], none["h"])
    assert torch.allclose(none["x"], none["h"]) and torch.allclose(none["dh"], none["dx"])

    # project: no span(Q) component in the output, nor in the gradient reaching the layer output
    assert (proj["x"] @ Q).abs().max() < tol
    assert (proj["dh"] @ Q).abs().max() < tol
    assert torch.allclose(proj["dh"], _proj(proj["dx"], Q), atol=1e-6)
    assert (none["dh"] @ Q).abs().max() > 1e-4  # not true without the ablation

    # detached: the forward of project; the gradient passes the site unchanged (as with no ablation)
    assert torch.allclose(det["x"], proj["x"], atol=1e-6)
    assert torch.allclose(det["dh"], det["dx"], atol=1e-7)
    assert (det["dh"] @ Q).abs().max() > 1e-4
    # parameters after the last site: same forward, same gradients as project; before it: different
    after, before = "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(det["grads"][after], proj["grads"][after], atol=1e-6)
    assert not torch.allclose(det["grads"][before], proj["grads"][before], atol=1e-7)

    # gradient: the forward of no ablation (identical loss graph values), projected gradient
    assert torch.allclose(grad["x"], none["x"])
    assert torch.allclose(grad["dx"], none["dx"], atol=1e-7)
    assert (grad["dh"] @ Q).abs().max() < tol
    assert torch.allclose(grad["dh"], _proj(none["dh"], Q), atol=1e-6)

    # mean: the span(Q) coordinates sit at the stored mean at every position; the rest is project's
    coords = mean["x"] @ Q  # (B, T, k)
    assert torch.allclose(coords, torch.tensor([0.5, -1.0, 2.0]).expand_as(coords), atol=1e-5)
    assert torch.allclose(_proj(mean["x"], Q), proj["x"], atol=1e-5)
    assert (mean["dh"] @ Q).abs().max() < tol

    # steer: h + c * the mean projection mu Q^T (all columns); gradient unchanged through the site
    v = Q @ torch.tensor([0.5, -1.0, 2.0])
    assert torch.allclose(steer["x"], steer["h"] + 2.5 * v, atol=1e-6)
    assert torch.allclose(steer["dh"], steer["dx"], atol=1e-7)


def test_nnsight_path_gives_same_layer_gradient_for_each_mode() -> None:
    """Every mode through nnsight equals the same mode through ablated() hooks (loss and gradients)."""
    sub = _subspace()
    for mode in EDIT_MODES:
        model = tiny_model("llama", hidden=D, layers=LAYERS)
        model.train()
        abl = make_ablation(mode, sub, means=_means(sub), steer_coef=1.5)
        ids = _ids()
        out = ablated_forward(wrap(model), Sites.of(model), abl, {"input_ids": ids, "labels": ids})
        out.loss.backward()
        g1 = _grads(model)
        model.zero_grad(set_to_none=True)
        with ablated(model, abl):
            ref = model(input_ids=ids, labels=ids).loss
        ref.backward()
        assert torch.allclose(out.loss, ref, atol=1e-6), mode
        for n, g in _grads(model).items():
            assert torch.allclose(g1[n], g, atol=1e-6, rtol=1e-5), (mode, n)


def test_apply_shapes_dtypes_and_passthrough() -> None:
    sub = _subspace()
    abl = make_ablation("project", sub)
    h = torch.randn(4, 7, D, dtype=torch.bfloat16)
    out = abl.apply(h, 0)
    assert out.dtype == torch.bfloat16 and out.shape == h.shape
    assert abl.apply(h, 1) is h  # layer 1 is not in the subspace
    assert abl.layers == [0, 2]
    assert abl.describe() == {"mode": "project", "layers": {"0": 3, "2": 2}}


def test_make_ablation_errors() -> None:
    sub = _subspace()
    with pytest.raises(SubspaceError, match="unknown ablation mode"):
        make_ablation(cast(AblationMode, "zero"), sub)
    with pytest.raises(SubspaceError, match="needs reference means"):
        make_ablation("mean", sub)
    with pytest.raises(SubspaceError, match="reference mean for layer 2"):
        make_ablation("mean", sub, means={0: torch.zeros(3)})
    with pytest.raises(SubspaceError, match="expected k=3"):
        make_ablation("mean", sub, means={0: torch.zeros(5), 2: torch.zeros(2)})
    with pytest.raises(SubspaceError, match="expected d_model=32"):
        make_ablation("steer", sub, vectors={0: torch.zeros(7)}, steer_coef=1.0)


def test_ablated_removes_hooks_on_error() -> None:
    model = tiny_model("llama", hidden=D, layers=LAYERS)
    abl = make_ablation("project", _subspace())
    layer0 = Sites.of(model).layer_module(model, 0)
    with pytest.raises(RuntimeError, match="boom"), ablated(model, abl):
        assert len(layer0._forward_hooks) == 1
        raise RuntimeError("boom")
    assert not layer0._forward_hooks


def test_compute_subspace_means_matches_manual() -> None:
    model = tiny_model("llama", hidden=D, layers=LAYERS)
    sub = _subspace()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    means = compute_subspace_means(model, [{"input_ids": ids, "attention_mask": mask}], sub)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for L in sub.layers:
        h = out.hidden_states[L + 1]  # hidden_states[0] is the embedding output
        if L == LAYERS - 1:
            continue  # the last entry is after the final norm in transformers
        coords = (h @ sub.bases[L])[mask.bool()]  # (N, k)
        assert torch.allclose(means[L], coords.mean(0), atol=1e-5)
    assert means[2].shape == (2,)


def test_subspace_means_stop_after_the_last_needed_layer() -> None:
    """The reference pass runs no layer above the subspace's last one (nor the head), and the means equal
    those of a full forward."""
    model = tiny_model("llama", hidden=D, layers=LAYERS)
    sub = Subspace.from_vectors({0: torch.randn(3, D, generator=torch.Generator().manual_seed(1))}, d_model=D)
    assert sub.layers == [0]
    ids = _ids()
    mask = torch.ones_like(ids)
    sites = Sites.of(model)
    ran: list[int] = []
    probes = [
        sites.layer_module(model, L).register_forward_hook(lambda *_a, L=L: ran.append(L))
        for L in range(LAYERS)
    ]
    try:
        means = compute_subspace_means(model, [{"input_ids": ids, "attention_mask": mask}], sub)
    finally:
        for handle in probes:
            handle.remove()
    assert ran == [0]
    assert all(not sites.layer_module(model, L)._forward_hooks for L in range(LAYERS))
    full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(means[0], (full @ sub.bases[0]).reshape(-1, 3).mean(0), atol=1e-5)


def test_random_subspace_and_spec() -> None:
    assert parse_layer_spec("1:4, -1:2") == {1: 4, -1: 2}
    for bad in ("1", "a:2", "1:2,1:3", ""):
        with pytest.raises(SubspaceError):
            parse_layer_spec(bad)
    sub = random_subspace("1:4,-1:2", d_model=D, seed=3, n_layers=LAYERS)
    assert sub.layers == [1, 2] and sub.bases[1].shape == (D, 4)
    again = random_subspace("1:4,-1:2", d_model=D, seed=3, n_layers=LAYERS)
    assert sub.digest() == again.digest()
    assert random_subspace("1:4", d_model=D, seed=4, n_layers=LAYERS).digest() != sub.digest()
    with pytest.raises(SubspaceError, match="out of range"):
        random_subspace("5:2", d_model=D, seed=0, n_layers=LAYERS)
    with pytest.raises(SubspaceError, match=r"must be in 1\.\.32"):
        random_subspace("0:40", d_model=D, seed=0, n_layers=LAYERS)


def test_linear_modes_keep_no_activation_for_backward() -> None:
    """project / mean / detached / gradient save only Q for backward, never an activation-sized tensor."""
    sub = _subspace()
    for mode in EDIT_MODES:
        abl = make_ablation(mode, sub, means=_means(sub), steer_coef=1.0)
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        h = torch.randn(4, 16, D, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = abl.apply(h, 0)
        out.sum().backward()
        assert h.grad is not None
        assert all(n <= D * 3 for n in sizes), (mode, sizes)


def test_project_under_bf16_autocast_keeps_the_residual_dtype() -> None:
    sub = _subspace()
    abl = make_ablation("project", sub)
    h = torch.randn(2, 5, D, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = abl.apply(h, 0)
    assert out.dtype == torch.float32
    ref = h - (h @ sub.bases[0]) @ sub.bases[0].T
    assert torch.allclose(out, ref, atol=1e-5)


def test_steer_defaults_to_the_mean_projection_and_needs_a_coefficient(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from caft.errors import ConfigError
    from caft.training.ablation import SteerAblation, steer_vectors
    from caft.training.config import AblationConfig

    sub = _subspace()
    means = _means(sub)
    with pytest.raises(ConfigError, match="explicit signed coefficient"):
        make_ablation("steer", sub, means=means)
    with pytest.raises(ValueError, match="needs a signed ablation.steer_coef"):
        AblationConfig(random="1:2", mode="steer")
    with pytest.raises(SubspaceError, match="mean projection"):
        make_ablation("steer", sub, steer_coef=4.0)  # no means, no vectors
    abl = make_ablation("steer", sub, means=means, steer_coef=-4.0)
    assert isinstance(abl, SteerAblation) and abl.describe()["steer_vector"] == "mean_projection"
    h = torch.randn(2, 5, D)
    for L, mu in means.items():
        Q = sub.bases[L]
        coords = mu if mu.numel() == Q.shape[1] else mu @ Q
        v = Q @ coords  # mean_x[(xQ)Q^T] when mu are the mean coordinates
        assert torch.allclose(abl.apply(h, L), h - 4.0 * v, atol=1e-5)
        assert torch.allclose((abl.apply(h, L) - h) @ Q, -4.0 * coords.expand(2, 5, -1), atol=1e-5)
    # the default uses every column of a multi-column layer: no warning
    caplog.set_level("WARNING", logger="caft.training.ablation")
    steer_vectors(sub, means=means)
    assert not caplog.records
    # an explicit vector along one column of a 3-column layer is used as given, with a warning
    Q0 = sub.bases[0]
    given = make_ablation("steer", sub, vectors={0: Q0[:, 0]}, steer_coef=2.0)
    assert torch.allclose(given.apply(h, 0), h + 2.0 * Q0[:, 0], atol=1e-6)
    assert given.describe()["steer_vector"] == "given"
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "layer 0 lies along 1 of the subspace's 3 columns" in text
    assert "subspace layer 2 (2 columns) has no steering vector" in text
