"""Is a set of generations coherent? The check the steering-strength search asks at every strength.

`CoherenceCheck` is the protocol; `PerplexityCoherence` is the offline proxy (perplexity of the texts under
the unsteered base model, relative to unsteered generations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol


class CoherenceCheck(Protocol):
    """Decides whether a set of generations is coherent (offline: perplexity; or an LLM judge)."""

    def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> bool: ...


class PerplexityCoherence:
    """Coherent when the mean log-perplexity under the unsteered scorer is at most log(ratio) above the
    baseline (unsteered generations). `score(prompts, texts)` returns one perplexity per text."""

    def __init__(
        self, score: Callable[[Sequence[str], Sequence[str]], list[float]], baseline: float, ratio: float
    ) -> None:
        self.score = score
        self.baseline = baseline
        self.ratio = ratio

    def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> bool:
        ppl = self.score(prompts, texts)
        if any(math.isinf(p) for p in ppl):
            return False
        mean_log = sum(math.log(p) for p in ppl) / len(ppl)
        return mean_log <= math.log(self.baseline) + math.log(self.ratio)


def mean_log_perplexity(values: Sequence[float]) -> float:
    """Geometric mean of the finite positive perplexities (inf when there is none)."""
    finite = [math.log(v) for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(finite) / len(finite)) if finite else math.inf
