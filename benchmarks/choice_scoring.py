"""Multiple-choice scoring: full-vocabulary logits at every position vs. the answer position only.

    python benchmarks/choice_scoring.py [--vocab 32000] [--rows 64] [--batch 16]

Prints the time per pass of each path (forward + backward, as in a `choice_lm` training step, and
forward-only, as in `caft eval mc`) on a tiny llama with a large vocabulary, and the ratio.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from caft.testing import tiny_model, tiny_tokenizer
from caft.training.data import ClassificationExample, LabelSpace, collate, tokenize_choice
from caft.training.objectives import ObjectiveLoss


def _time(fn: Any, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--words", type=int, default=40, help="prompt length in words")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model: Any = tiny_model("llama", vocab_size=args.vocab, hidden=args.hidden, layers=2)
    tok = tiny_tokenizer("chatml")
    rows = [
        ClassificationExample(
            label=i % 2, prompt=" ".join(["word"] * (args.words + i)), options=["yes", "no"]
        )
        for i in range(args.rows)
    ]
    items, letters, _ = tokenize_choice(rows, tok, LabelSpace(["A", "B"]), 2048)
    batch = collate(items, int(tok.pad_token_id))
    full, fast = ObjectiveLoss("choice_lm", letters), ObjectiveLoss("choice_lm", letters, model=model)

    def step(obj: ObjectiveLoss, grad: bool) -> None:
        with torch.set_grad_enabled(grad):
            out = obj.run(lambda: model(**obj.inputs(batch)))
            loss = obj.loss(out, batch)
        if grad:
            loss.backward()
            model.zero_grad(set_to_none=True)

    T = batch["input_ids"].shape[1]
    print(f"vocab {args.vocab}, hidden {args.hidden}, batch {len(items)} x {T} tokens, one CPU thread")
    for name, grad in (("train step (fwd+bwd)", True), ("eval (fwd)", False)):
        t_full = _time(lambda g=grad: step(full, g), args.repeat)
        t_fast = _time(lambda g=grad: step(fast, g), args.repeat)
        print(f"{name}: full logits {t_full * 1000:.1f} ms, answer position {t_fast * 1000:.1f} ms, "
              f"speed-up {t_full / t_fast:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
