"""Streaming PCA on activation differences, and the diff stage on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from interp_helpers import chat_rows, make_adapter, make_pair, write_jsonl

from caft.config import ModelConfig
from caft.interp.collect import collect_diffs
from caft.interp.config import DiffConfig, InputsConfig
from caft.interp.inputs import Example, make_batches
from caft.interp.pca import StreamingDiffPCA, run_diff
from caft.interp.schema import load_candidates, load_directions
from caft.interp.source import ActivationSource


def _reference_pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA by SVD of the mean-centred matrix: (eigenvalues, components (d, k), ratios)."""
    xc = x - x.mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    evals = s**2 / x.shape[0]
    return evals[:k], vh[:k].T, evals[:k] / evals.sum()


@pytest.mark.parametrize("splits", [[500], [1, 499], [7] * 71 + [3], [250, 0, 250]])
def test_streaming_pca_equals_svd_for_several_batchings(splits: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    d = 12
    mix = torch.randn(d, d, generator=g)
    x = (torch.randn(500, d, generator=g, dtype=torch.float64) @ mix.double()) + 3.0  # offset mean
    pca = StreamingDiffPCA([5], d)
    start = 0
    for n in splits:
        pca.update(5, x[start : start + n].float())
        start += n
    assert start == 500
    res = pca.result(5, 4)
    ref_vals, ref_vecs, ref_ratio = _reference_pca(x.float().double(), 4)
    assert res.n == 500
    torch.testing.assert_close(res.eigenvalues, ref_vals, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.explained_variance_ratio, ref_ratio, rtol=1e-5, atol=1e-6)
    # same subspace up to sign per component
    cos = (res.components * ref_vecs).sum(0).abs()
    torch.testing.assert_close(cos, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.mean, x.float().double().mean(0), rtol=1e-6, atol=1e-6)


def test_streaming_pca_state_roundtrip(tmp_path: Path) -> None:
    x = torch.randn(64, 6)
    pca = StreamingDiffPCA([0, 2], 6)
    pca.update(0, x[:30])
    pca.update(2, x)
    pca.save(tmp_path / "m.safetensors")
    again = StreamingDiffPCA.load(tmp_path / "m.safetensors")
    assert again.layers == [0, 2] and again.count == {0: 30, 2: 64}
    torch.testing.assert_close(again.covariance(2), pca.covariance(2))


def test_streaming_pca_rejects_nan() -> None:
    from caft.errors import DataError

    pca = StreamingDiffPCA([0], 3)
    with pytest.raises(DataError, match="non-finite"):
        pca.update(0, torch.tensor([[0.0, float("nan"), 1.0]]))


def test_run_diff_matches_brute_force_and_writes_candidates(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(20))
    cfg = DiffConfig(inputs=InputsConfig(data=[str(data)]), layers=[1, -1], n_components=3, batch_size=6)
    out = run_diff(cfg, tmp_path / "run", model=base, finetuned=ft)

    cands = load_candidates(out)
    dirs = load_directions(out)
    assert [c.id for c in cands] == [
        "pc:L1:0", "pc:L1:1", "pc:L1:2", "vec:L1:mean", "pc:L2:0", "pc:L2:1", "pc:L2:2", "vec:L2:mean",
    ]  # fmt: skip
    assert set(dirs) == {c.id for c in cands}
    for v in dirs.values():
        assert v.shape == (32,) and abs(float(v.norm()) - 1) < 1e-5
    done = json.loads((out / "DONE.json").read_text())["info"]
    assert done["layers"] == [1, 2] and done["n_examples"] == 20

    # brute force: all assistant-token differences at layer 2, PCA by SVD
    source = ActivationSource.load(base, ft)
    rows = [json.loads(line) for line in (out / "inputs.jsonl").read_text().splitlines()]
    examples = [Example.from_json(r) for r in rows]
    assert all(any(e.select) and not all(e.select) for e in examples)  # assistant tokens only
    diffs = torch.cat([db.diffs[2] for db in collect_diffs(source, make_batches(examples, 4, 0), [2])])
    _ref_vals, ref_vecs, ref_ratio = _reference_pca(diffs.double(), 3)
    pcs = [c for c in cands if c.layer == 2 and c.kind == "pc"]
    got = torch.tensor([c.scores["explained_variance_ratio"] for c in pcs], dtype=torch.float64)
    torch.testing.assert_close(got, ref_ratio, rtol=1e-4, atol=1e-6)
    for i, c in enumerate(pcs):
        assert abs(float(dirs[c.id].double() @ ref_vecs[:, i])) == pytest.approx(1.0, abs=1e-4)
    mean = diffs.double().mean(0)
    assert float(dirs["vec:L2:mean"].double() @ (mean / mean.norm())) == pytest.approx(1.0, abs=1e-5)


def test_run_diff_resumes_from_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(24))
    cfg = DiffConfig(inputs=InputsConfig(data=[str(data)]), layers=[1], n_components=2, batch_size=4,
                     checkpoint_every=2)  # fmt: skip
    full = run_diff(cfg, tmp_path / "a", model=base, finetuned=ft)

    import caft.interp.pca as pca_mod

    real_update = pca_mod.StreamingDiffPCA.update
    calls = {"n": 0}

    def crashing_update(self: StreamingDiffPCA, layer: int, x: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # batch index 4: after the checkpoint at 4 batches
            raise KeyboardInterrupt
        real_update(self, layer, x)

    monkeypatch.setattr(pca_mod.StreamingDiffPCA, "update", crashing_update)
    with pytest.raises(KeyboardInterrupt):
        run_diff(cfg, tmp_path / "b", model=base, finetuned=ft)
    stage = tmp_path / "b" / "diff"
    assert not (stage / "DONE.json").exists() and not (stage / "candidates.jsonl").exists()
    assert json.loads((stage / "state.json").read_text())["batches_done"] == 4
    monkeypatch.setattr(pca_mod.StreamingDiffPCA, "update", real_update)
    resumed = run_diff(cfg, tmp_path / "b", model=base, finetuned=ft)
    a, b = load_directions(full), load_directions(resumed)
    for cid in a:
        assert abs(float(a[cid] @ b[cid])) == pytest.approx(1.0, abs=1e-5)
    assert not (stage / "state.json").exists()


def test_adapter_on_base_equals_merged_model(tmp_path: Path) -> None:
    base, _ = make_pair(tmp_path)
    adapter_dir, merged_dir = make_adapter(tmp_path, Path(base.name_or_path))
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(12))
    cfg = DiffConfig(inputs=InputsConfig(data=[str(data)]), layers=[2], n_components=2)
    ft_adapter = ModelConfig(name_or_path=base.name_or_path, adapter=str(adapter_dir), device="cpu")
    src = ActivationSource.load(base, ft_adapter)
    assert src.shared and src.base is src.ft  # one model in memory
    out_a = run_diff(cfg, tmp_path / "ra", source=src)
    out_m = run_diff(cfg, tmp_path / "rm", model=base, finetuned=ModelConfig(name_or_path=str(merged_dir)))
    ca, cm = load_candidates(out_a), load_candidates(out_m)
    for x, y in zip(ca, cm, strict=True):
        assert x.id == y.id
        assert x.scores["explained_variance_ratio" if x.kind == "pc" else "mean_norm"] == pytest.approx(
            y.scores["explained_variance_ratio" if y.kind == "pc" else "mean_norm"], rel=1e-3
        )
    # the adapter folder alone as `finetuned` also works
    src2 = ActivationSource.load(base, ModelConfig(name_or_path=str(adapter_dir)))
    assert src2.shared


def test_generated_answers_are_cached_and_analysed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import caft.interp.answers as answers_mod
    from caft.interp.answers import GENERATIONS_FILE

    base, ft = make_pair(tmp_path)
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Say hello."}, {"messages": [{"role": "user", "content": "Hi?"}]}]
    )
    inputs = InputsConfig(generate=True, prompts=str(prompts), samples_per_prompt=2, max_new_tokens=6)
    cfg = DiffConfig(inputs=inputs, layers=[1], n_components=2)
    calls: list[int] = []
    real = answers_mod.generate_chat

    def counting(*a: Any, **kw: Any) -> list[str]:
        out = real(*a, **kw)
        calls.append(len(out))
        return out

    monkeypatch.setattr(answers_mod, "generate_chat", counting)
    out = run_diff(cfg, tmp_path / "run", model=base, finetuned=ft)
    cache = [json.loads(line) for line in (out / GENERATIONS_FILE).read_text().splitlines()]
    assert sorted((r["prompt"], r["sample"]) for r in cache) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sum(calls) == 4
    docs = [json.loads(line)["doc"] for line in (out / "inputs.jsonl").read_text().splitlines()]
    assert docs and all(d.startswith("gen:") for d in docs)
    # a rerun of a half-finished stage samples nothing new
    (out / "DONE.json").unlink()
    (out / "inputs.jsonl").unlink()
    run_diff(cfg, tmp_path / "run", model=base, finetuned=ft)
    assert sum(calls) == 4
