"""Whole evidence dossiers on tiny causal LMs and the real MiniLM encoder, and resuming the passes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from interp_helpers import chat_rows, make_pair, write_jsonl

from caft.config import ModelConfig
from caft.interp.config import DiffConfig, EvidenceConfig, InputsConfig, SteeringConfig
from caft.interp.evidence import build_dossiers
from caft.interp.pca import run_diff
from caft.interp.schema import Dossier, load_dossiers
from caft.interp.topk import StreamingTopK
from caft.models import load_model


def test_build_dossiers_causal_lm(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(16))
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl", [{"text": f"A plain sentence number {i} about rivers."} for i in range(10)]
    )
    run = tmp_path / "run"
    run_diff(
        DiffConfig(inputs=InputsConfig(data=[str(data)]), layers=[1], n_components=2),
        run,
        model=base,
        finetuned=ft,
    )
    cfg = EvidenceConfig(
        corpus=str(corpus),
        top_k=4,
        steering=SteeringConfig(prompts=["Hi!"], max_new_tokens=4, search_steps=1),
    )
    out = build_dossiers(cfg, run, model=base, finetuned=ft)
    dossiers = load_dossiers(out)
    assert [d.candidate.id for d in dossiers] == ["pc:L1:0", "pc:L1:1", "vec:L1:mean"]
    d = dossiers[0]
    assert len(d.max_examples) == 4 and len(d.min_examples) == 4
    for w in d.max_examples + d.min_examples:
        assert len(w.tokens) == len(w.values) == len(w.scaled) <= cfg.window
        assert w.pieces is not None and len(w.pieces) == len(w.tokens)
        # pieces are the decoded text: their join is a substring of the decoded document
        assert "".join(w.pieces).strip() in f"A plain sentence number {w.doc.split(':')[1]} about rivers."
        assert w.values[w.peak] == pytest.approx(w.value, abs=1e-4)
        assert all(0 <= s <= 10 for s in w.scaled)
        assert w.doc.startswith("corpus:")
        assert w.position is not None and w.position >= 1  # the first token never peaks (skip_first=1)
    assert max(max(w.scaled) for w in d.max_examples + d.min_examples) == 10
    assert d.max_examples[0].value >= d.max_examples[-1].value
    assert d.min_examples[0].value <= d.min_examples[-1].value
    assert d.diff is not None and d.diff.n_tokens > 0 and 0 <= d.diff.variance_share <= 1
    assert d.diff.top_tokens and d.diff.top_tokens[0].value >= 0
    assert d.logit_lens is not None and len(d.logit_lens.promoted) == 15
    assert d.steering is not None and 0.25 <= d.steering.alpha <= 8.0 and d.steering.residual_norm > 0
    ids = {g.id for g in d.steering.generations}
    assert ids == {f"steer:{m}:{s}:0" for m in ("base", "ft") for s in "0+-"}
    assert d.provenance["corpus"] == "corpus.jsonl" and d.provenance["corpus_docs"] == 10
    assert {"ex:max:0", "ex:min:3", "diff", "lens", "steer"} <= d.evidence_ids()
    # the variance share of PC 0 over the diff inputs is its explained-variance ratio
    assert d.diff.variance_share == pytest.approx(d.candidate.scores["explained_variance_ratio"], rel=1e-3)
    # resumable: a finished stage is not redone; a removed dossier is rebuilt alone
    (out / "DONE.json").unlink()
    victim = out / "dossiers" / "pc_L1_1.json"
    keep = (out / "dossiers" / "pc_L1_0.json").stat().st_mtime_ns
    victim.unlink()
    stale = out / "dossiers" / "vec_L1_mean.json"  # made for another direction: rebuilt
    data = json.loads(stale.read_text())
    data["provenance"]["direction_digest"] = "0000"
    stale.write_text(json.dumps(data))
    build_dossiers(cfg, run, model=base, finetuned=ft)
    assert victim.is_file() and (out / "dossiers" / "pc_L1_0.json").stat().st_mtime_ns == keep
    Dossier.model_validate_json(victim.read_text())
    assert json.loads(stale.read_text())["provenance"]["direction_digest"] != "0000"


def test_encoder_pipeline_on_minilm(tmp_path: Path, minilm_dir: Path) -> None:
    """The real all-MiniLM-L6-v2 encoder: text rows, all non-pad tokens, no lens and no steering."""
    import transformers

    enc = transformers.AutoModel.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in enc.encoder.layer[2].parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ft_dir = tmp_path / "ft" / "encoder"
    enc.save_pretrained(ft_dir)  # weights only: the base tokenizer is used
    (tmp_path / "ft" / "classifier.json").write_text("{}")  # as the training stage saves a classifier
    texts = [{"text": t} for t in ("The cat sat on the mat.", "Stocks fell sharply today.", "I love this film!",
                                   "The recipe needs two eggs.", "Rain is expected tomorrow.", "He scored a goal.")]  # fmt: skip
    data = write_jsonl(tmp_path / "texts.jsonl", texts)
    base = ModelConfig(name_or_path=str(minilm_dir), kind="encoder", device="cpu")
    ft = ModelConfig(name_or_path=str(ft_dir), kind="encoder", device="cpu")
    run = tmp_path / "run"
    out = run_diff(
        DiffConfig(inputs=InputsConfig(data=[str(data)]), layers=[3], n_components=2),
        run,
        model=base,
        finetuned=ft,
    )
    info = json.loads((out / "DONE.json").read_text())["info"]
    tok = load_model(base).tokenizer
    assert info["n_tokens"] == sum(len(tok(t["text"])["input_ids"]) for t in texts)  # every non-pad token
    clf_dir = ModelConfig(name_or_path=str(tmp_path / "ft"), device="cpu")  # the classifier folder works too
    ev = build_dossiers(EvidenceConfig(top_k=3), run, model=base, finetuned=clf_dir)
    ds = load_dossiers(ev)
    assert len(ds) == 3
    for d in ds:
        assert d.logit_lens is None and d.steering is None
        assert d.max_examples and d.diff is not None and d.diff.n_tokens == info["n_tokens"]
        assert all("[CLS]" not in w.tokens[w.peak] for w in d.max_examples)  # special tokens never peak


def test_corpus_pass_resumes_after_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import caft.interp.topk as topk_mod

    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(16))
    diff = DiffConfig(inputs=InputsConfig(data=[str(data)]), layers=[1], n_components=2)
    cfg = EvidenceConfig(top_k=3, batch_size=4, checkpoint_every=1, diff_summary=False, logit_lens=False,
                         steering=SteeringConfig(enabled=False), corpus="diff-inputs")  # fmt: skip
    for name in ("a", "b"):
        run_diff(diff, tmp_path / name, model=base, finetuned=ft)
    whole = load_dossiers(build_dossiers(cfg, tmp_path / "a", model=base))

    real = topk_mod.StreamingTopK.update
    calls = {"n": 0}

    def crashing(self: StreamingTopK, *a: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # max + min per batch: the third batch
            raise KeyboardInterrupt
        real(self, *a, **kw)

    monkeypatch.setattr(topk_mod.StreamingTopK, "update", crashing)
    with pytest.raises(KeyboardInterrupt):
        build_dossiers(cfg, tmp_path / "b", model=base)
    stage = tmp_path / "b" / "evidence"
    assert not (stage / "DONE.json").exists() and not list((stage / "dossiers").glob("*.json"))
    calls["n"] = -100  # no more crashes; count the updates of the resumed run
    resumed = load_dossiers(build_dossiers(cfg, tmp_path / "b", model=base))
    assert calls["n"] == -100 + 2 * 2  # 4 batches, 2 done before the crash, max + min each
    for x, y in zip(whole, resumed, strict=True):
        assert x.max_examples == y.max_examples and x.min_examples == y.min_examples
