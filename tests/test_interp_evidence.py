"""Evidence building blocks: streaming top-k windows, batched projections, logit lens, steering."""

from __future__ import annotations

import math

import pytest
import torch

from caft.config import ModelConfig
from caft.interp.evidence_passes import LayerGroup, project
from caft.interp.lens import lens_logits, logit_lens, steer
from caft.interp.schema import Candidate
from caft.interp.steering import search_alpha
from caft.interp.topk import StreamingTopK
from caft.testing import tiny_model, tiny_tokenizer


def _brute_force(
    acts: torch.Tensor, valid: torch.Tensor, k: int, sign: int
) -> list[list[tuple[float, int, int]]]:
    """Per column: the k best (value, doc, pos) over the whole corpus tensor (D, T, C)."""
    D, T, C = acts.shape
    out = []
    for c in range(C):
        items = [(float(acts[d, t, c]), d, t) for d in range(D) for t in range(T) if bool(valid[d, t])]
        items.sort(key=lambda x: -sign * x[0])
        out.append(items[:k])
    return out


@pytest.mark.parametrize(("batch", "sign"), [(1, 1), (3, 1), (4, -1), (11, -1)])
def test_streaming_topk_equals_brute_force(batch: int, sign: int) -> None:
    g = torch.Generator().manual_seed(batch)
    D, T, C, k = 11, 9, 5, 4
    acts = torch.randn(D, T, C, generator=g)
    lengths = torch.randint(2, T + 1, (D,), generator=g)
    valid = torch.arange(T)[None, :] < lengths[:, None]
    top = StreamingTopK(C, k, before=3, after=2, sign=sign)
    for s in range(0, D, batch):
        top.update(acts[s : s + batch], valid[s : s + batch], torch.arange(s, min(s + batch, D)))
    ref = _brute_force(acts, valid, k, sign)
    for c in range(C):
        hits = top.hits(c)
        assert [(h.doc, h.pos) for h in hits] == [(d, t) for _, d, t in ref[c]]
        for h, (v, d, _t) in zip(hits, ref[c], strict=True):
            assert h.value == pytest.approx(v)
            for j, wv in enumerate(h.values):  # window values straight from the corpus tensor
                p = h.start + j
                if 0 <= p < int(lengths[d]):
                    assert wv == pytest.approx(float(acts[d, p, c]))
                else:
                    assert math.isnan(wv)


def test_topk_with_fewer_tokens_than_k() -> None:
    top = StreamingTopK(2, 10, 1, 1)
    top.update(torch.ones(1, 3, 2), torch.tensor([[True, True, False]]), torch.tensor([0]))
    assert len(top.hits(0)) == 2


def test_projection_of_all_candidates_equals_one_at_a_time() -> None:
    g = torch.Generator().manual_seed(1)
    d, C = 16, 7
    dirs = torch.randn(d, C, generator=g)
    dirs = dirs / dirs.norm(dim=0)
    cands = [Candidate(id=f"pc:L0:{i}", kind="pc", layer=0, index=i) for i in range(C)]
    group = LayerGroup(0, cands, dirs)
    h = torch.randn(3, 5, d, generator=g)
    together = project(group, h)
    assert together.shape == (3, 5, C)
    for i in range(C):
        single = LayerGroup(0, [cands[i]], dirs[:, i : i + 1])
        torch.testing.assert_close(together[..., i], project(single, h)[..., 0])


def test_logit_lens_equals_manual_computation() -> None:
    from caft.models import LoadedModel
    from caft.sites import Sites

    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)  # a non-trivial final norm
    sites = Sites.of(model)
    u = torch.randn(32)
    got = lens_logits(model, sites, u)
    eps = model.config.rms_norm_eps
    normed = model.model.norm.weight * (u / torch.sqrt(u.pow(2).mean() + eps))
    manual = model.lm_head.weight @ normed
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-5)
    loaded = LoadedModel(
        model, tiny_tokenizer(), sites, torch.device("cpu"), torch.float32, ModelConfig(name_or_path="x")
    )
    lens = logit_lens(loaded, u, k=5)
    assert [t.value for t in lens.promoted] == pytest.approx(manual.topk(5).values.tolist(), abs=1e-5)
    assert [t.value for t in lens.suppressed] == pytest.approx(
        (-manual).topk(5).values.neg().tolist(), abs=1e-5
    )


def test_steering_hook_equals_nnsight_intervention() -> None:
    from nnsight import NNsight

    from caft.sites import Sites

    model = tiny_model("llama", layers=3)
    sites = Sites.of(model)
    ids = torch.randint(5, 400, (2, 7))
    v = torch.randn(32) * 3
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with steer(model, sites, 1, v):
            hooked = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    wrapped = NNsight(model)
    with torch.no_grad(), wrapped.trace(ids):
        layer = sites.layer_envoy(wrapped, 1)
        layer.output = layer.output + v
        out = wrapped.output.save()
    torch.testing.assert_close(hooked, out.logits)
    assert not torch.allclose(hooked, plain)  # the steering did something
    torch.testing.assert_close(after, plain)  # and the hook came off


def test_search_alpha_finds_the_coherence_boundary() -> None:
    seen: list[float] = []

    def generate(alpha: float) -> list[str]:
        seen.append(alpha)
        return ["ok" if abs(alpha) <= 2.0 else ""]

    def coherent(prompts: object, texts: list[str]) -> bool:
        return all(texts)

    alpha, trace = search_alpha(generate, coherent, ["p"], 0.25, 8.0, steps=6)
    assert 1.8 <= alpha <= 2.0
    assert trace[0] == {"alpha": 8.0, "coherent": False} and any(t["coherent"] for t in trace)
    assert min(seen) < 0  # both signs were tried
    alpha_all, _ = search_alpha(lambda a: ["x"], coherent, ["p"], 0.25, 8.0, steps=3)
    assert alpha_all == 8.0
