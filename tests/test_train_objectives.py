"""The classification objectives: answer-letter scoring on a causal LM, and the encoder classifier."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import train_helpers
from train_helpers import jsonl as _jsonl

from caft.subspace import Subspace
from caft.testing import save_tiny
from caft.training.config import build_train_config
from caft.training.trainer import train

llama_dir = train_helpers.llama_dir  # the shared fixture


def test_choice_objective_full_ft_with_steering(tmp_path: Path, llama_dir: Path) -> None:
    rows = [{"prompt": f"Is {i} even?", "options": ["yes", "no"], "label": i % 2} for i in range(16)]
    data = _jsonl(tmp_path / "mc.jsonl", rows[:12])
    held = _jsonl(tmp_path / "held.jsonl", rows[12:])
    cfg = build_train_config(
        "spurious",
        values={
            "model": {"name_or_path": str(llama_dir), "device": "cpu"},
            "data": {"path": str(data), "eval_path": str(held)},
            "optim": {"lr": 1e-3, "batch_size": 4, "max_steps": 3},
            "ablation": {"random": "1:2", "mode": "steer", "steer_coef": 3.0},
            "progress": False,
        },
    )
    res = train(cfg, tmp_path / "o")
    assert 0.0 <= res.metrics["eval_accuracy"] <= 1.0 and res.metrics["eval_loss"] > 0
    rec = json.loads((tmp_path / "o" / "caft_training.json").read_text())
    assert rec["objective"] == "choice_lm" and len(rec["letter_token_ids"]) == 2
    assert rec["ablation"]["steer_coef"] == 3.0 and rec["data"]["tokenize"]["train"]["kept"] == 12
    # the evaluation helper scores exactly what the trainer evaluated (same format, same ablation)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caft.training.ablation import load_means, make_ablation
    from caft.training.choice import choice_accuracy, choice_scores
    from caft.training.data import read_classification_jsonl

    model = AutoModelForCausalLM.from_pretrained(res.final_path)
    tok = AutoTokenizer.from_pretrained(res.final_path)
    examples = read_classification_jsonl(held)
    assert rec["ablation"]["steer_vector"] == "mean_projection"
    means = load_means(tmp_path / "o" / rec["ablation"]["means_file"])
    abl = make_ablation("steer", Subspace.load(tmp_path / "o" / "subspace"), means=means, steer_coef=3.0)
    scores, gold = choice_scores(model, tok, examples, ablation=abl)
    loss = torch.nn.functional.cross_entropy(scores, torch.tensor(gold))
    assert abs(loss.item() - res.metrics["eval_loss"]) < 1e-4
    assert choice_accuracy(model, tok, examples, ablation=abl) == res.metrics["eval_accuracy"]
    plain, _ = choice_scores(model, tok, examples)
    assert not torch.allclose(plain, scores)


def test_encoder_classifier_trains_saves_and_predicts(tmp_path: Path) -> None:
    from caft.training.ablation import make_ablation
    from caft.training.classifier import EncoderClassifier, accuracy, predict, predict_logits
    from caft.training.data import read_classification_jsonl

    enc_dir = save_tiny(tmp_path / "bert", "bert", template=None, hidden=32, layers=2)
    rows = [{"text": f"{w} movie number {i}", "label": w} for i in range(8) for w in ("good", "bad")]
    data = _jsonl(tmp_path / "c.jsonl", rows)
    cfg = build_train_config(
        None,
        values={
            "model": {"name_or_path": str(enc_dir), "kind": "encoder", "device": "cpu"},
            "objective": "encoder_classifier",
            "method": "full",
            "freeze_embeddings": True,
            "data": {"path": str(data), "eval_fraction": 0.25},
            "optim": {"lr": 1e-3, "head_lr": 1e-2, "batch_size": 4, "grad_accum": 1, "max_steps": 4},
            "ablation": {"random": "0:3", "mode": "project"},
            "progress": False,
        },
    )
    res = train(cfg, tmp_path / "o")
    clf = res.model
    assert isinstance(clf, EncoderClassifier) and clf.label_names == ["bad", "good"]
    fresh_base = EncoderClassifier.from_encoder(str(enc_dir), ["bad", "good"])
    emb = clf.encoder.embeddings.word_embeddings.weight
    assert torch.equal(emb, fresh_base.encoder.embeddings.word_embeddings.weight)  # frozen
    loaded = EncoderClassifier.load(res.final_path)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(res.final_path / "encoder")
    texts = ["good movie number 3", "bad movie number 1"]
    assert torch.allclose(predict_logits(loaded, tok, texts), predict_logits(clf, tok, texts), atol=1e-5)
    sub = Subspace.load(tmp_path / "o" / "subspace")
    abl = make_ablation("project", sub)
    assert not torch.allclose(
        predict_logits(loaded, tok, texts, ablation=abl), predict_logits(loaded, tok, texts), atol=1e-6
    )
    assert all(not m._forward_hooks for m in loaded.modules())
    # the training path (nnsight) and the evaluation path (hooks) ablate the classifier identically
    from caft.sites import Sites
    from caft.training.ablation import ablated
    from caft.training.forward import ablated_forward, wrap

    enc = tok(texts, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    via_nnsight = ablated_forward(wrap(loaded), Sites.of(loaded), abl, inputs)
    with torch.no_grad(), ablated(loaded, abl):
        via_hooks = loaded(**inputs)
    assert torch.allclose(via_nnsight, via_hooks, atol=1e-6)
    examples = read_classification_jsonl(data)
    acc = accuracy(loaded, tok, examples)
    preds = predict(loaded, tok, [ex.text or "" for ex in examples])
    assert (
        acc
        == sum(p == ["bad", "good"].index(str(ex.label)) for p, ex in zip(preds, examples, strict=True)) / 16
    )
    assert "eval_accuracy" in res.metrics


def test_encoder_classifier_on_real_minilm_roundtrip(tmp_path: Path, minilm_dir: Path) -> None:
    from transformers import AutoTokenizer

    from caft.training.classifier import EncoderClassifier, predict_logits

    clf = EncoderClassifier.from_encoder(str(minilm_dir), ["neg", "pos"], seed=3)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    clf.save(tmp_path / "clf", tok)
    back = EncoderClassifier.load(tmp_path / "clf")
    texts = ["a wonderful film", "dull and far too long"]
    assert torch.allclose(predict_logits(back, tok, texts), predict_logits(clf, tok, texts), atol=1e-5)
    from caft.sites import Sites

    assert Sites.of(clf).n_layers == 6 and Sites.of(clf).d_model == 384
