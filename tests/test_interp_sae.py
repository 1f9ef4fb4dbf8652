"""SAEs: sae-lens save/reload, dictionary_learning checkpoints, attribution, rankings, training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from interp_helpers import chat_rows, make_pair, write_jsonl

from caft.errors import ModelError, SiteError
from caft.interp.collect import collect_diffs
from caft.interp.config import DiffConfig, InputsConfig, SAEConfig, SAESpec, SAETrainConfig
from caft.interp.inputs import Example, TokenBatch, make_batches
from caft.interp.pca import run_diff
from caft.interp.sae import run_sae_rank
from caft.interp.sae_load import (
    LoadedSAE,
    check_site,
    load_dictionary_learning,
    load_registry,
    load_sae_lens_dir,
    load_sae_lens_pretrained,
)
from caft.interp.sae_rank import attribution_batch
from caft.interp.schema import load_candidates, load_directions
from caft.interp.source import ActivationSource

D_IN, D_SAE = 32, 48


def _write_dl(folder: Path, dict_class: str, state: dict[str, torch.Tensor], **trainer: Any) -> Path:
    folder.mkdir(parents=True)
    torch.save(state, folder / "ae.pt")
    cfg = {"trainer": {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, **trainer}}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _linear_keys(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.1,
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g),
    }


def test_dictionary_learning_checkpoints_load_and_encode(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, D_IN, generator=g)

    # standard ReLU AutoEncoder
    st = {**_linear_keys(g), "bias": torch.randn(D_IN, generator=g)}
    sae = load_dictionary_learning(_write_dl(tmp_path / "std", "AutoEncoder", st), layer=2)
    ref = torch.relu((x - st["bias"]) @ st["encoder.weight"].T + st["encoder.bias"])
    torch.testing.assert_close(sae.encode(x), ref)
    torch.testing.assert_close(sae.W_dec, st["decoder.weight"].T)
    assert (sae.d_in, sae.d_sae, sae.layer) == (D_IN, D_SAE, 2)

    # TopK: the k largest post-ReLU pre-activations per token
    tk = {**_linear_keys(g), "b_dec": torch.randn(D_IN, generator=g), "k": torch.tensor(5, dtype=torch.int),
          "threshold": torch.tensor(-1.0)}  # fmt: skip
    sae = load_dictionary_learning(_write_dl(tmp_path / "topk", "AutoEncoderTopK", tk, k=5), layer=2)
    pre = torch.relu((x - tk["b_dec"]) @ tk["encoder.weight"].T + tk["encoder.bias"])
    z = sae.encode(x)
    assert bool(((z > 0).sum(1) <= 5).all())
    for row in range(10):
        top = pre[row].topk(5)
        torch.testing.assert_close(z[row, top.indices], top.values)

    # BatchTopK with a learned threshold: latents above it
    bt = {**tk, "threshold": torch.tensor(0.2)}
    sae = load_dictionary_learning(_write_dl(tmp_path / "btk", "BatchTopKSAE", bt, k=5), layer=2)
    torch.testing.assert_close(sae.encode(x), pre * (pre > 0.2))
    # ... and without one: k * batch latents over the whole batch
    sae = load_dictionary_learning(_write_dl(tmp_path / "btk0", "BatchTopKSAE", tk, k=5), layer=2)
    assert int((sae.encode(x) > 0).sum()) == 5 * 10

    # JumpReLU
    jr = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
        "threshold": torch.rand(D_SAE, generator=g) * 0.3,
    }
    sae = load_dictionary_learning(_write_dl(tmp_path / "jr", "JumpReluAutoEncoder", jr), layer=2)
    pre = x @ jr["W_enc"] + jr["b_enc"]
    ref = torch.relu(pre * (pre > jr["threshold"])) * jr["W_dec"].norm(dim=1)
    torch.testing.assert_close(sae.encode(x), ref)


def test_dictionary_learning_bad_checkpoints(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    with pytest.raises(ModelError, match="lacks"):
        load_dictionary_learning(_write_dl(tmp_path / "a", "AutoEncoder", _linear_keys(g)), layer=0)
    with pytest.raises(ModelError, match="unsupported dictionary class"):
        load_dictionary_learning(_write_dl(tmp_path / "b", "Mystery", _linear_keys(g)), layer=0)
    with pytest.raises(SiteError, match="trained on layer 3"):
        st = {**_linear_keys(g), "bias": torch.zeros(D_IN)}
        load_dictionary_learning(_write_dl(tmp_path / "c", "AutoEncoder", st, layer=3), layer=1)
    with pytest.raises(ModelError, match="not a dictionary_learning checkpoint"):
        load_dictionary_learning(tmp_path, layer=0)


def test_sae_lens_saved_and_reloaded_encodes_identically(tmp_path: Path) -> None:
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    x = torch.randn(20, D_IN)
    for name, sae in (
        ("std", StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))),
        ("topk", TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))),
    ):
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        sae.save_model(tmp_path / name)
        loaded = load_sae_lens_dir(tmp_path / name, layer=1)
        torch.testing.assert_close(loaded.encode(x), sae.encode(x).detach())
        torch.testing.assert_close(loaded.W_dec, sae.W_dec.detach())
    with pytest.raises(ModelError, match="not an sae-lens folder"):
        load_sae_lens_dir(tmp_path, layer=1)


def test_sae_lens_unknown_release_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="cannot load the sae-lens SAE"):
        load_sae_lens_pretrained("no-such-release-xyz", "blocks.0", layer=0)


def test_sae_d_in_must_match_the_site() -> None:
    sae = LoadedSAE("s", 1, torch.nn.Identity(), torch.zeros(8, 16), 16, 8, "test")
    with pytest.raises(SiteError, match=r"16-dim activations.*d_model=32"):
        check_site(sae, 32)


def test_attribution_matches_manual_autograd(tmp_path: Path) -> None:
    from caft.testing import tiny_model

    model = tiny_model("llama", layers=3)
    from caft.sites import Sites

    sites = Sites.of(model)
    g = torch.Generator().manual_seed(0)
    st = {**_linear_keys(g), "bias": torch.randn(D_IN, generator=g) * 0.1}
    sae = load_dictionary_learning(_write_dl(tmp_path / "std", "AutoEncoder", st), layer=1)
    ids = torch.randint(5, 400, (2, 6), generator=g)
    att = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    sel = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    batch = TokenBatch(0, ids, att, sel, ["a", "b"])
    special = {int(ids[0, 3])}  # a special token mid-sequence: never counted
    got = attribution_batch(model, sites, [sae], batch, torch.device("cpu"), special)["dl:std"]

    # manual: make the layer-1 output a leaf, backprop the masked next-token loss, sum per latent
    leaf: dict[str, torch.Tensor] = {}

    def hook(_m: Any, _i: Any, out: Any) -> Any:
        x = out.detach().requires_grad_(True)
        leaf["x"] = x
        return x

    h = model.model.layers[1].register_forward_hook(hook)
    logits = model(input_ids=ids, attention_mask=att).logits
    h.remove()
    labels = ids.masked_fill(~sel, -100)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 400), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    (grad,) = torch.autograd.grad(loss, leaf["x"])
    x = leaf["x"].detach()
    manual = torch.zeros(D_SAE)
    for b in range(2):
        for t in range(1, 6):  # position 0 (BOS / attention sink) is left out
            if att[b, t] and int(ids[b, t]) not in special:
                z = torch.relu((x[b, t] - st["bias"]) @ st["encoder.weight"].T + st["encoder.bias"])
                manual += (st["decoder.weight"].T @ grad[b, t]) * z
    torch.testing.assert_close(got.float(), manual, rtol=1e-4, atol=1e-6)
    assert float(got.abs().sum()) > 0


def test_attribution_leaves_out_bos_and_special_tokens(tmp_path: Path) -> None:
    """F2: a latent that fires only on position 0 / special tokens gets no attribution."""
    from caft.sites import Sites
    from caft.testing import tiny_model

    model = tiny_model("llama", layers=3)
    g = torch.Generator().manual_seed(1)
    st = {**_linear_keys(g), "bias": torch.zeros(D_IN)}
    sae = load_dictionary_learning(_write_dl(tmp_path / "std", "AutoEncoder", st), layer=1)
    ids = torch.randint(5, 400, (1, 6), generator=g)
    sel = torch.ones(1, 6, dtype=torch.bool)
    batch = TokenBatch(0, ids, torch.ones(1, 6, dtype=torch.long), sel, ["a"])
    full = attribution_batch(model, Sites.of(model), [sae], batch, torch.device("cpu"))["dl:std"]
    # the same batch with every position but 0 marked special: nothing is left to count
    rest = {int(i) for i in ids[0, 1:]} - {int(ids[0, 0])}
    none = attribution_batch(model, Sites.of(model), [sae], batch, torch.device("cpu"), rest)["dl:std"]
    assert float(full.abs().sum()) > 0
    assert float(none.abs().sum()) == 0.0


def test_attribution_over_two_layers_matches_each_layer_alone(tmp_path: Path) -> None:
    """The gradient at a shallow layer still flows through a deeper hooked layer."""
    from caft.sites import Sites
    from caft.testing import tiny_model

    model = tiny_model("llama", layers=3)
    sites = Sites.of(model)
    g = torch.Generator().manual_seed(2)
    s0 = load_dictionary_learning(
        _write_dl(tmp_path / "a", "AutoEncoder", {**_linear_keys(g), "bias": torch.zeros(D_IN)}), 0, "a"
    )
    s1 = load_dictionary_learning(
        _write_dl(tmp_path / "b", "AutoEncoder", {**_linear_keys(g), "bias": torch.zeros(D_IN)}), 1, "b"
    )
    ids = torch.randint(5, 400, (2, 7), generator=g)
    batch = TokenBatch(
        0, ids, torch.ones(2, 7, dtype=torch.long), torch.ones(2, 7, dtype=torch.bool), ["x", "y"]
    )
    cpu = torch.device("cpu")
    both = attribution_batch(model, sites, [s0, s1], batch, cpu)
    torch.testing.assert_close(both["a"], attribution_batch(model, sites, [s0], batch, cpu)["a"])
    torch.testing.assert_close(both["b"], attribution_batch(model, sites, [s1], batch, cpu)["b"])
    assert float(both["a"].abs().sum()) > 0


def test_attribution_on_a_frozen_adapter_pair_computes_no_parameter_gradients(tmp_path: Path) -> None:
    """F1: the fine-tune as a LoRA adapter on the base (one shared, frozen model) ranks by attribution,
    and no parameter gradient is ever allocated."""
    from interp_helpers import make_adapter

    from caft.config import ModelConfig

    base, _ = make_pair(tmp_path)
    adapter_dir, _ = make_adapter(tmp_path, Path(base.name_or_path))
    ft = ModelConfig(name_or_path=base.name_or_path, adapter=str(adapter_dir), device="cpu")
    source = ActivationSource.load(base, ft)
    assert source.shared
    assert not any(p.requires_grad for p in source.base.model.parameters())
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(6))
    g = torch.Generator().manual_seed(5)
    dl = _write_dl(tmp_path / "dl", "AutoEncoder", {**_linear_keys(g), "bias": torch.zeros(D_IN)})
    for which in ("ft", "base"):
        cfg = SAEConfig(
            saes=[SAESpec(layer=1, source="dictionary_learning", path=str(dl))],
            inputs=InputsConfig(data=[str(data)]),
            rankings=["attribution"],
            attribution_model=which,
            top_n=3,
        )
        cands = load_candidates(run_sae_rank(cfg, tmp_path / f"run_{which}", source=source))
        assert len(cands) == 3 and all(c.scores["attribution"] != 0 for c in cands)
    assert all(p.grad is None for p in source.base.model.parameters())


def test_run_sae_rank_with_dictionary_learning_and_trained_sae(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(12))
    run = tmp_path / "run"
    run_diff(
        DiffConfig(inputs=InputsConfig(data=[str(data)]), layers=[1], n_components=2),
        run,
        model=base,
        finetuned=ft,
    )
    g = torch.Generator().manual_seed(2)
    st = {**_linear_keys(g), "bias": torch.zeros(D_IN)}
    dl = _write_dl(tmp_path / "dl", "AutoEncoder", st)
    cfg = SAEConfig(
        saes=[
            SAESpec(layer=1, source="dictionary_learning", path=str(dl), name="dl1"),
            SAESpec(layer=2, source="train"),
        ],
        top_n=4,
        train=SAETrainConfig(expansion=2, k=4, training_tokens=2048, batch_size=128),
    )
    out = run_sae_rank(cfg, run, model=base, finetuned=ft)
    cands = load_candidates(out)
    dirs = load_directions(out)
    by_sae = {c.sae for c in cands}
    assert by_sae == {"dl1", "trained:L2"}
    for c in cands:
        assert c.kind == "sae" and set(c.scores) >= {
            "mean_diff",
            "sae_diff",
            "attribution",
            "mean_base",
            "mean_ft",
        }
        assert c.ranks and all(0 <= r < 4 for r in c.ranks.values())
        assert abs(float(dirs[c.id].norm()) - 1) < 1e-5
    # each ranking's top-4 are in, ordered by |score|
    dl_cands = [c for c in cands if c.sae == "dl1"]
    for r in ("mean_diff", "sae_diff", "attribution"):
        ranked = sorted((c for c in dl_cands if r in c.ranks), key=lambda c: c.ranks[r])
        assert len(ranked) == 4
        vals = [abs(c.scores[r]) for c in ranked]
        assert vals == sorted(vals, reverse=True)

    # mean_diff equals a brute-force computation with the same SAE
    source = ActivationSource.load(base, ft)
    sae = load_dictionary_learning(dl, layer=1)
    examples = [
        Example.from_json(json.loads(line))
        for line in (run / "diff" / "inputs.jsonl").read_text().splitlines()
    ]
    zs_b, zs_f = [], []
    for db in collect_diffs(source, make_batches(examples, 5, 0), [1]):
        zs_b.append(sae.encode(db.base[1]))
        zs_f.append(sae.encode(db.base[1] + db.diffs[1]))
    md = torch.cat(zs_f).mean(0) - torch.cat(zs_b).mean(0)
    for c in dl_cands:
        assert c.scores["mean_diff"] == pytest.approx(float(md[c.index]), abs=1e-5)

    # the registry reloads the same SAEs (the trained one with its input scale)
    reg = load_registry(out)
    assert set(reg) == {"dl1", "trained:L2"}
    assert reg["trained:L2"].input_scale > 0 and (out / "trained" / "L2" / "caft_sae.json").is_file()
    x = torch.randn(3, D_IN)
    torch.testing.assert_close(reg["dl1"].encode(x), sae.encode(x))


def test_run_sae_rank_rejects_mismatched_sae(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(4))
    g = torch.Generator().manual_seed(0)
    small = {"encoder.weight": torch.randn(8, 16, generator=g), "encoder.bias": torch.zeros(8),
             "decoder.weight": torch.randn(16, 8, generator=g), "bias": torch.zeros(16)}  # fmt: skip
    folder = tmp_path / "small"
    folder.mkdir()
    torch.save(small, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    cfg = SAEConfig(
        saes=[SAESpec(layer=1, source="dictionary_learning", path=str(folder))],
        inputs=InputsConfig(data=[str(data)]),
    )
    with pytest.raises(SiteError, match="d_model=32"):
        run_sae_rank(cfg, tmp_path / "run", model=base, finetuned=ft)
    stage = tmp_path / "run" / "sae"
    assert not (stage / "DONE.json").exists() and not (stage / "candidates.jsonl").exists()


def test_sae_rank_resumes_after_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import caft.interp.sae_rank as sae_mod

    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(12))
    g = torch.Generator().manual_seed(4)
    dl = _write_dl(tmp_path / "dl", "AutoEncoder", {**_linear_keys(g), "bias": torch.zeros(D_IN)})
    cfg = SAEConfig(
        saes=[SAESpec(layer=1, source="dictionary_learning", path=str(dl))],
        inputs=InputsConfig(data=[str(data)]),
        batch_size=3,
        checkpoint_every=1,
        top_n=6,
    )
    whole = load_candidates(run_sae_rank(cfg, tmp_path / "a", model=base, finetuned=ft))

    real = sae_mod.attribution_batch
    calls = {"n": 0}

    def crashing(*a: Any, **kw: Any) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sae_mod, "attribution_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_sae_rank(cfg, tmp_path / "b", model=base, finetuned=ft)
    stage = tmp_path / "b" / "sae"
    assert (stage / "rank_state.pt").is_file() and not (stage / "candidates.jsonl").exists()
    counted: list[int] = []

    def counting(*a: Any, **kw: Any) -> dict[str, torch.Tensor]:
        counted.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(sae_mod, "attribution_batch", counting)
    resumed = load_candidates(run_sae_rank(cfg, tmp_path / "b", model=base, finetuned=ft))
    assert len(counted) == 2  # 4 batches, 2 done before the crash
    assert [c.id for c in resumed] == [c.id for c in whole]
    for x, y in zip(whole, resumed, strict=True):
        assert x.scores == pytest.approx(y.scores, rel=1e-6, abs=1e-9)
    assert not (stage / "rank_state.pt").exists()
