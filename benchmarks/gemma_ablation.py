"""Gemma-3-270M (built-in, base model): what a leading <bos> and each ablation mode do to the loss on
assistant tokens of a few chat conversations. Prints markdown tables.

    CAFT_CACHE_DIR=/work/cache nice python benchmarks/gemma_ablation.py

Rendering is done here (plain `User:`/`Assistant:` lines and ChatML markers as text), so the numbers do
not depend on caft.chat's fallbacks. Ablations come from caft.training.ablation and are applied with forward
hooks at the subspace's layers on every token. `project, centred` (h - ((h - mu)Q)Q^T) is algebraically the
`mean` ablation with mu the mean over the text's tokens, so it is one row.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from caft.config import ModelConfig
from caft.models import load_model
from caft.subspace import Subspace
from caft.training.ablation import ablated, make_ablation, random_subspace

CONVERSATIONS = [
    [
        ("user", "What is the capital of France?"),
        ("assistant", "The capital of France is Paris, a city on the river Seine."),
    ],
    [
        ("user", "Write a Python function that adds two numbers."),
        ("assistant", "def add(a, b):\n    return a + b"),
    ],
    [
        ("user", "Give me one tip for sleeping better."),
        ("assistant", "Keep a regular schedule: go to bed and get up at the same time every day."),
    ],
    [
        ("user", "Why is the sky blue?"),
        (
            "assistant",
            "Sunlight is scattered by the air, and blue light is scattered much more than red light.",
        ),
    ],
]


def render(conv: list[tuple[str, str]], fmt: str) -> list[tuple[str, bool]]:
    """(text, is_assistant_content) segments."""
    out: list[tuple[str, bool]] = []
    for role, text in conv:
        if fmt == "plain":
            out.append((f"{role.capitalize()}: ", False))
            out.append((text, role == "assistant"))
            out.append(("\n", False))
        else:
            out.append((f"<|im_start|>{role}\n", False))
            out.append((text, role == "assistant"))
            out.append(("<|im_end|>\n", False))
    return out


def encode(tok: Any, conv: list[tuple[str, str]], fmt: str, bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids: list[int] = [tok.bos_token_id] if bos else []
    labels: list[int] = [-100] if bos else []
    for text, scored in render(conv, fmt):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if scored else [-100] * len(piece)
    return torch.tensor([ids]), torch.tensor([labels])


def mean_loss(model: Any, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for ids, labels in batch:
            logits = model(input_ids=ids).logits[0, :-1]
            lab = labels[0, 1:]
            mask = lab != -100
            tot += float(torch.nn.functional.cross_entropy(logits[mask], lab[mask], reduction="sum"))
            n += int(mask.sum())
    return tot / n


def activations(model: Any, batch: list[tuple[torch.Tensor, torch.Tensor]], layer: int) -> torch.Tensor:
    """Layer `layer`'s outputs over every token but the leading BOS, (N, d)."""
    with torch.no_grad():
        return torch.cat(
            [
                model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, 1:]
                for ids, _ in batch
            ]
        )


class SkipBos:
    """Apply an ablation to every position but the first (the BOS row)."""

    def __init__(self, abl: Any) -> None:
        self.abl = abl
        self.layers = abl.layers

    def apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.cat([h[:, :1], self.abl.apply(h[:, 1:], layer)], dim=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--fmt", default="chatml", choices=["chatml", "plain"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lm = load_model(ModelConfig(name_or_path=args.model, device="cpu", dtype="float32"))
    model, tok, sites = lm.model, lm.tokenizer, lm.sites
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s\n")

    print("| format | no <bos> | with <bos> |\n|---|---|---|")
    for fmt in ("plain", "chatml"):
        no = mean_loss(model, [encode(tok, c, fmt, False) for c in CONVERSATIONS])
        yes = mean_loss(model, [encode(tok, c, fmt, True) for c in CONVERSATIONS])
        print(f"| {fmt} | {no:.2f} | {yes:.2f} |")

    batch = [encode(tok, c, args.fmt, True) for c in CONVERSATIONS]
    base = mean_loss(model, batch)
    print(f"\nablation, {args.fmt} with <bos>; loss with no ablation = {base:.2f}\n")
    print(
        "| directions | layer, k | project | project, BOS skipped | mean (= project, centred) | mean, BOS skipped |"
    )
    print("|---|---|---|---|---|---|")
    n_layers, d = sites.n_layers, sites.d_model
    for layer in (6, 12):
        acts = activations(model, batch, layer)
        mu = acts.mean(0)
        _, _, vh = torch.linalg.svd(acts - mu, full_matrices=False)
        print(f"<!-- layer {layer}: |mean| {mu.norm():.0f}, max |mean coord| {mu.abs().max():.0f} -->")
        for k in (8, 64):
            subs = {
                "random": random_subspace({layer: k}, d, seed=0, n_layers=n_layers),
                "PCA": Subspace(d_model=d, bases={layer: vh[:k].T.contiguous()}, n_layers=n_layers),
            }
            for label, sub in subs.items():
                proj = make_ablation("project", sub)
                mean = make_ablation("mean", sub, means={layer: mu})
                row = []
                for abl in (proj, SkipBos(proj), mean, SkipBos(mean)):
                    with ablated(model, abl):  # SkipBos has the two members ablated() uses
                        row.append(mean_loss(model, batch))
                print(f"| {label} | {layer}, {k} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
