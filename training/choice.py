"""Multiple-choice scoring of a causal LM, in exactly the format the `choice_lm` objective trains on:
the question, lettered options, `Answer:`, and the option letters' logits at the last position.

    acc = choice_accuracy(model, tokenizer, examples)                  # trained model
    acc = choice_accuracy(model, tokenizer, examples, ablation=abl)    # test-time-only ablation baseline
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from caft.errors import DataError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from caft.training.ablation import Ablation
    from caft.training.data import ClassificationExample


@dataclass
class AnswerHead:
    """Letter logits from the final hidden states at the answer position only: the final norm's output is
    captured by a forward hook, and `Sites.token_logits` applies the letters' unembedding rows there.
    Exact (same logits as the full head at those ids), without a (B, T, vocabulary) tensor."""

    model: Any
    letter_ids: list[int]
    norm: Any

    @classmethod
    def of(cls, model: Any, letter_ids: list[int]) -> AnswerHead | None:
        """None when the model has no known final norm or no unembedding (use the full logits then)."""
        from caft.sites import Sites

        sites = Sites.of(model)
        norm = sites.final_norm(model)
        if norm is None or sites.unembed(model) is None:
            return None
        return cls(model, list(letter_ids), norm)

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        seen: dict[str, torch.Tensor] = {}

        def hook(_m: Any, _i: Any, out: Any) -> None:
            seen["hidden"] = out[0] if isinstance(out, tuple) else out

        handle = self.norm.register_forward_hook(hook)
        try:
            yield seen
        finally:
            handle.remove()

    def scores(self, seen: dict[str, torch.Tensor], last_index: torch.Tensor) -> torch.Tensor:
        """(B, n_letters) float32 letter logits at each row's last real token."""
        import torch

        from caft.sites import Sites

        hidden = seen["hidden"]  # (B, T, d), after the final norm
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        at = hidden[rows, last_index.to(hidden.device)]  # (B, d)
        return Sites.of(self.model).token_logits(self.model, at, self.letter_ids).float()


def choice_scores(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ClassificationExample],
    label_names: Sequence[str] | None = None,
    ablation: Ablation | None = None,
    batch_size: int = 16,
    max_length: int = 2048,
) -> tuple[torch.Tensor, list[int]]:
    """Letter logits (N, n_options) and the gold option indices. `label_names` maps string labels of
    `{"text", "label"}` rows to options (as in training; default: inferred from the examples)."""
    import torch

    from caft.training.ablation import ablated
    from caft.training.data import LabelSpace, collate, tokenize_choice
    from caft.training.objectives import ObjectiveLoss

    if not examples:
        raise DataError("no examples to score")
    space = LabelSpace.infer(examples, label_names)
    items, letters, _ = tokenize_choice(examples, tokenizer, space, max_length, "truncate")
    task = ObjectiveLoss("choice_lm", letters, model=model)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad(), ablated(model, ablation):
            for i in range(0, len(items), batch_size):
                batch = collate(items[i : i + batch_size], pad)
                inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in task.inputs(batch).items()}
                out = task.run(lambda inputs=inputs: model(**inputs))
                chunks.append(task.scores(out, batch).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks), [int(x.target or 0) for x in items]


def choice_accuracy(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ClassificationExample],
    label_names: Sequence[str] | None = None,
    ablation: Ablation | None = None,
    batch_size: int = 16,
    max_length: int = 2048,
) -> float:
    """Fraction of examples whose highest-scoring letter is the gold option."""
    scores, gold = choice_scores(model, tokenizer, examples, label_names, ablation, batch_size, max_length)
    pred = scores.argmax(dim=-1).tolist()
    return sum(int(p == g) for p, g in zip(pred, gold, strict=True)) / len(gold)
