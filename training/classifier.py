"""Encoder + linear head classifier, and the prediction / accuracy helpers the evaluations call.

    clf = EncoderClassifier.from_encoder("path/to/minilm", label_names=["neg", "pos"])
    logits = clf(input_ids, attention_mask)                 # (B, n_classes), mean-pooled over real tokens
    clf.save(dir); clf = EncoderClassifier.load(dir)
    preds = predict(clf, tokenizer, texts, ablation=abl)   # test-time-only ablation baseline
    acc = accuracy(clf, tokenizer, examples)

On disk (a directory): `encoder/` (transformers `save_pretrained` + tokenizer: loads with `AutoModel`
alone), `head.safetensors` (weight (n, d), bias (n,)), `classifier.json` (label names, pooling, format).
The module has a `config` (the encoder's), so `caft.sites.Sites.of(classifier)` finds the encoder layers
and ablations install on it like on any model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from caft.errors import ModelError
from caft.rundir import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import torch
    from caft.training.ablation import Ablation
    from caft.training.data import ClassificationExample
    from transformers import PreTrainedTokenizerBase

FORMAT = "caft.encoder_classifier/1"
HEAD_FILE = "head.safetensors"
META_FILE = "classifier.json"
ENCODER_DIR = "encoder"


class EncoderClassifier(nn.Module):
    """Mean pooling over attention-masked encoder outputs, then a linear head."""

    def __init__(self, encoder: Any, label_names: Sequence[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.label_names = [str(n) for n in label_names]
        d = int(encoder.config.hidden_size)
        self.head = nn.Linear(d, len(self.label_names))

    @property
    def config(self) -> Any:
        return self.encoder.config

    @classmethod
    def from_encoder(cls, name_or_path: str, label_names: Sequence[str], seed: int = 0) -> EncoderClassifier:
        import torch
        from transformers import AutoModel

        try:
            encoder = AutoModel.from_pretrained(name_or_path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load encoder {name_or_path!r}: {e}") from e
        torch.manual_seed(seed)
        return cls(encoder, label_names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (B, T, d)
        m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, d)
        logits: torch.Tensor = self.head(pooled)  # (B, n)
        return logits

    def save(self, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
        from safetensors.torch import save

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(d / ENCODER_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(d / ENCODER_DIR)
        head = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        atomic_write_bytes(d / HEAD_FILE, save(head))
        atomic_write_json(
            d / META_FILE, {"format": FORMAT, "label_names": self.label_names, "pooling": "mean"}
        )
        return d

    @classmethod
    def load(cls, directory: str | Path) -> EncoderClassifier:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel

        d = Path(directory)
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise ModelError(f"{d} is not an encoder classifier directory (no {META_FILE})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ModelError(f"{meta_path}: expected format {FORMAT!r}, got {meta.get('format')!r}")
        encoder = AutoModel.from_pretrained(d / ENCODER_DIR, dtype=torch.float32)
        clf = cls(encoder, meta["label_names"])
        clf.head.load_state_dict(load_file(str(d / HEAD_FILE)))
        clf.eval()
        return clf


def predict_logits(
    clf: EncoderClassifier,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    ablation: Ablation | None = None,
    batch_size: int = 64,
    max_length: int = 256,
) -> torch.Tensor:
    """Class logits (N, n_classes) for `texts`, with `ablation` applied through hooks when given."""
    import torch
    from caft.training.ablation import ablated

    device = next(clf.parameters()).device
    was_training = clf.training
    clf.eval()
    chunks = []
    try:
        with torch.no_grad(), ablated(clf, ablation):
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(
                    list(texts[i : i + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                chunks.append(clf(enc["input_ids"], enc["attention_mask"]).float().cpu())
    finally:
        clf.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, len(clf.label_names))


def predict(
    clf: EncoderClassifier,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    ablation: Ablation | None = None,
    batch_size: int = 64,
    max_length: int = 256,
) -> list[int]:
    """Predicted class indices (into `clf.label_names`)."""
    logits = predict_logits(clf, tokenizer, texts, ablation, batch_size, max_length)
    return [int(i) for i in logits.argmax(dim=-1).tolist()]


def accuracy(
    clf: EncoderClassifier,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ClassificationExample],
    ablation: Ablation | None = None,
    batch_size: int = 64,
    max_length: int = 256,
) -> float:
    """Fraction of `{"text", "label"}` examples classified right (labels: index or name)."""
    from caft.training.data import LabelSpace

    if not examples:
        raise ModelError("accuracy over zero examples is undefined")
    space = LabelSpace(clf.label_names)
    texts = [ex.text or "" for ex in examples]
    gold = [space.index(ex.label, ex.line) for ex in examples]
    preds = predict(clf, tokenizer, texts, ablation, batch_size, max_length)
    return sum(int(p == g) for p, g in zip(preds, gold, strict=True)) / len(gold)
