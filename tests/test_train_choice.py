"""Letter scoring at the answer position only equals the full-vocabulary logits path (loss, accuracy,
gradients), through plain forwards and through the nnsight ablation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from caft.sites import Sites
from caft.testing import tiny_model, tiny_tokenizer
from caft.training.ablation import make_ablation, random_subspace
from caft.training.choice import AnswerHead, choice_accuracy, choice_scores
from caft.training.data import ClassificationExample, LabelSpace, collate, tokenize_choice
from caft.training.forward import ablated_forward, wrap
from caft.training.objectives import ObjectiveLoss

EXAMPLES = [
    ClassificationExample(label=i % 3, prompt=f"Question {i}: which number is {i}?" + " more" * (i % 4),
                          options=[str(i), str(i + 1), "none"], line=i + 1)
    for i in range(10)
]  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_answer_position_scores_equal_full_logits(arch: str) -> None:
    model: Any = tiny_model(arch, hidden=32, layers=3)
    if arch == "gemma2":
        assert model.config.final_logit_softcapping  # the soft-capping must be applied too
    tok = tiny_tokenizer("chatml")
    items, letters, _ = tokenize_choice(EXAMPLES, tok, LabelSpace(["A", "B", "C"]), 512)
    batch = collate(items, int(tok.pad_token_id))
    full, fast = ObjectiveLoss("choice_lm", letters), ObjectiveLoss("choice_lm", letters, model=model)
    assert full.head is None and isinstance(fast.head, AnswerHead)
    model.train()
    out_full = model(**full.inputs(batch))
    assert out_full.logits.shape[1] == batch["input_ids"].shape[1]
    loss_full = full.loss(out_full, batch)
    loss_full.backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    seen = fast.run(lambda: model(**fast.inputs(batch)))
    loss_fast = fast.loss(seen, batch)
    loss_fast.backward()
    assert torch.allclose(loss_fast, loss_full, atol=1e-6)
    assert torch.allclose(fast.scores(seen, batch), full.scores(out_full, batch), atol=1e-5)
    assert fast.correct(seen, batch) == full.correct(out_full, batch)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, g_full[n], atol=1e-6, rtol=1e-4), n
    # the same through the nnsight ablation (the trainer's path)
    sub = random_subspace("2:3", 32, seed=0, n_layers=3)
    abl = make_ablation("project", sub)
    model.zero_grad(set_to_none=True)
    ref = full.loss(ablated_forward(wrap(model), Sites.of(model), abl, full.inputs(batch)), batch)
    got = fast.loss(
        fast.run(lambda: ablated_forward(wrap(model), Sites.of(model), abl, fast.inputs(batch))), batch
    )
    assert torch.allclose(got, ref, atol=1e-6) and not torch.allclose(got, loss_full, atol=1e-4)
    # the evaluation helper (evals/mc.py uses it) scores with the fast path and gets the same accuracy
    model.eval()
    with torch.no_grad():
        expected = full.scores(model(**full.inputs(batch)), batch)
    scores, gold = choice_scores(model, tok, EXAMPLES)
    assert torch.allclose(scores, expected, atol=1e-5)
    acc = sum(int(p == g) for p, g in zip(expected.argmax(-1).tolist(), gold, strict=True)) / len(gold)
    assert choice_accuracy(model, tok, EXAMPLES) == acc
