"""Multiple-choice scoring of a causal LM, in exactly the format the `choice_lm` objective trains on:
the question, lettered options, `Answer:`, and the option letters' logits at the last position.

    acc = choice_accuracy(model, tokenizer, examples)                  # trained model
    acc = choice_accuracy(model, tokenizer, examples, ablation=abl)    # test-time-only ablation baseline
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from caft.errors import DataError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from caft.training.ablation import Ablation
    from caft.training.data import ClassificationExample


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
    task = ObjectiveLoss("choice_lm", letters)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad(), ablated(model, ablation):
            for i in range(0, len(items), batch_size):
                batch = collate(items[i : i + batch_size], pad)
                out = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                )
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
