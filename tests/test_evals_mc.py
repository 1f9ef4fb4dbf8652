"""`caft eval mc`: accuracy ID/OOD for an encoder classifier and a causal LM (letter scoring), and the
test-time-only ablation baseline (parity with caft.training's own prediction under the same ablation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from caft.config import ModelConfig
from caft.evals.mc import run_mc_eval
from caft.rundir import read_jsonl

TEXTS = [
    "the cat sat",
    "a dog ran home",
    "numbers 1 2 3",
    "code and science",
    "football and tennis",
    "wonderful movie",
]


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def classifier(tmp_path: Path) -> Path:
    from caft.testing import tiny_model, tiny_tokenizer
    from caft.training.classifier import EncoderClassifier

    torch.manual_seed(0)
    clf = EncoderClassifier(tiny_model("bert", hidden=32, layers=2), ["neg", "pos"])
    with torch.no_grad():
        clf.head.weight.mul_(50.0)  # confident, well separated predictions
    return clf.save(tmp_path / "clf", tiny_tokenizer(None))


def subspace_dir(tmp_path: Path, d_model: int, layer: int, k: int = 8) -> Path:
    from caft.subspace import Subspace

    g = torch.Generator().manual_seed(1)
    sub = Subspace.from_vectors({layer: torch.randn(k, d_model, generator=g)}, d_model=d_model)
    return sub.save(tmp_path / "sub")


def test_encoder_classifier_id_ood_and_test_time_ablation(classifier: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from caft.subspace import Subspace
    from caft.training.ablation import make_ablation
    from caft.training.classifier import EncoderClassifier, predict

    clf = EncoderClassifier.load(classifier)
    tok = AutoTokenizer.from_pretrained(str(classifier / "encoder"))
    preds = predict(clf, tok, TEXTS)
    names = clf.label_names
    id_file = write(
        tmp_path / "id.jsonl", [{"text": t, "label": names[p]} for t, p in zip(TEXTS, preds, strict=True)]
    )
    ood_file = write(
        tmp_path / "ood.jsonl", [{"text": t, "label": 1 - p} for t, p in zip(TEXTS, preds, strict=True)]
    )
    model = ModelConfig(name_or_path=str(classifier), kind="encoder", device="cpu")
    s = run_mc_eval(model, id_file, tmp_path / "plain", ood_file)
    assert s["mc"]["id"]["rate"] == 1.0 and s["mc"]["ood"]["rate"] == 0.0
    assert s["mc"]["id"]["n"] == len(TEXTS) and s["test_time_ablation"] is None
    assert len(read_jsonl(tmp_path / "plain" / "predictions.jsonl")) == 2 * len(TEXTS)

    sub = subspace_dir(tmp_path, 32, layer=1, k=16)
    s2 = run_mc_eval(model, id_file, tmp_path / "ablated", ood_file, subspace=sub)
    assert s2["test_time_ablation"]["mode"] == "project"
    abl = make_ablation("project", Subspace.load(sub, 32, 2))
    expected = predict(clf, tok, TEXTS, ablation=abl)
    got = [r["pred"] for r in read_jsonl(tmp_path / "ablated" / "predictions.jsonl") if r["split"] == "id"]
    assert got == expected
    assert s2["mc"]["id"]["rate"] == pytest.approx(
        sum(int(a == b) for a, b in zip(expected, preds, strict=True)) / len(TEXTS)
    )


def test_test_time_mean_ablation_uses_the_given_reference_means(classifier: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from caft.errors import ConfigError
    from caft.subspace import Subspace
    from caft.training.ablation import make_ablation, save_means
    from caft.training.classifier import EncoderClassifier, predict

    clf = EncoderClassifier.load(classifier)
    tok = AutoTokenizer.from_pretrained(str(classifier / "encoder"))
    id_file = write(tmp_path / "id.jsonl", [{"text": t, "label": 0} for t in TEXTS])
    sub = subspace_dir(tmp_path, 32, layer=1, k=16)
    means = {1: torch.full((16,), -30.0)}  # far enough from 0 to flip the predictions
    save_means(tmp_path / "means.safetensors", means)
    model = ModelConfig(name_or_path=str(classifier), kind="encoder", device="cpu")
    s = run_mc_eval(
        model,
        id_file,
        tmp_path / "m",
        subspace=sub,
        ablation_mode="mean",
        ablation_means=tmp_path / "means.safetensors",
    )
    assert s["test_time_ablation"]["mode"] == "mean"
    loaded = Subspace.load(sub, 32, 2)
    expected = predict(clf, tok, TEXTS, ablation=make_ablation("mean", loaded, means=means))
    assert [r["pred"] for r in read_jsonl(tmp_path / "m" / "predictions.jsonl")] == expected
    assert expected != predict(clf, tok, TEXTS, ablation=make_ablation("project", loaded))
    with pytest.raises(ConfigError, match="reference means"):
        run_mc_eval(model, id_file, tmp_path / "n", subspace=sub, ablation_mode="mean")


def test_causal_lm_letter_scoring_matches_unbatched_forward(tmp_path: Path) -> None:
    from caft.models import load_model
    from caft.testing import save_tiny
    from caft.training.data import LabelSpace, choice_prompt, letter_token_ids, read_classification_jsonl

    d = save_tiny(tmp_path / "lm", "llama", template="chatml")
    rows = [
        {"prompt": "Which is an animal?", "options": ["cat", "car"], "label": 0},
        {
            "prompt": "Pick the sport of the two or three options given here please",
            "options": ["tennis", "bread", "soup"],
            "label": "tennis",
        },
        {"prompt": "Numbers?", "options": ["one", "two"], "label": 1},
    ]
    f = write(tmp_path / "mc.jsonl", rows)
    cfg = ModelConfig(name_or_path=str(d), device="cpu", dtype="float32")
    s = run_mc_eval(cfg, f, tmp_path / "out", batch_size=2)
    got = [r["pred"] for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")]
    # reference: one example at a time, no padding
    loaded = load_model(cfg)
    exs = read_classification_jsonl(f)
    ids, space = letter_token_ids(loaded.tokenizer, 3)
    labels = LabelSpace(["A", "B", "C"])
    expected = []
    for ex in exs:
        enc = loaded.tokenizer(
            choice_prompt(ex, labels, space), add_special_tokens=False, return_tensors="pt"
        )
        with torch.no_grad():
            logits = loaded.model(**enc).logits[0, -1, ids[: len(ex.options or [])]]
        expected.append(int(logits.argmax()))
    assert got == expected
    assert s["mc"]["id"]["n"] == 3 and s["model_kind"] == "causal_lm_letters"


def test_mc_errors(classifier: Path, tmp_path: Path) -> None:
    from caft.errors import ConfigError, DataError

    model = ModelConfig(name_or_path=str(classifier), kind="encoder", device="cpu")
    choice = write(tmp_path / "c.jsonl", [{"prompt": "q", "options": ["a", "b"], "label": 0}])
    with pytest.raises(DataError, match="text"):
        run_mc_eval(model, choice, tmp_path / "o")
    texts = write(tmp_path / "t.jsonl", [{"text": "x", "label": 0}])
    with pytest.raises(ConfigError, match="mode"):
        run_mc_eval(model, texts, tmp_path / "o", subspace=tmp_path, ablation_mode="gradient")
