"""Steered generations and the bounded search for the steering strength.

Steering adds `alpha * residual_norm * unit` to the residual output of one layer at every position;
`alpha` is in units of the typical residual norm at that layer so that one scale means the same thing
across layers and models. The strength is the largest alpha in [alpha_min, alpha_max] at which the
steered generations (with +alpha and -alpha) stay coherent by the `CoherenceCheck` in use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from caft.interp.coherence import CoherenceCheck, PerplexityCoherence, mean_log_perplexity
from caft.interp.config import EvidenceConfig
from caft.interp.lens import answer_perplexity, steer
from caft.interp.schema import Generation, Steering
from caft.interp.source import ActivationSource, Which
from caft.models import generate_chat


def search_alpha(
    generate: Callable[[float], list[str]],
    coherent: CoherenceCheck,
    prompts: Sequence[str],
    alpha_min: float,
    alpha_max: float,
    steps: int,
) -> tuple[float, list[dict[str, Any]]]:
    """Largest alpha in [alpha_min, alpha_max] (geometric bisection, `steps` steps) at which generations
    with +alpha and -alpha are both coherent. `generate(alpha) -> list[str]` runs the steered model.
    Returns the alpha and a trace of what was tried. If even alpha_min is incoherent, alpha_min is
    returned and the trace says so."""
    trace: list[dict[str, Any]] = []

    def ok(alpha: float) -> bool:
        good = all(coherent(prompts, generate(sign * alpha)) for sign in (1.0, -1.0))
        trace.append({"alpha": alpha, "coherent": good})
        return good

    if ok(alpha_max):
        return alpha_max, trace
    if not ok(alpha_min):
        return alpha_min, trace
    lo, hi = alpha_min, alpha_max
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, trace


class Steerer:
    """Steered generations for one candidate at a time; unsteered generations are made once."""

    def __init__(
        self, cfg: EvidenceConfig, source: ActivationSource, coherence: CoherenceCheck | None
    ) -> None:
        self.cfg = cfg.steering
        self.seed = cfg.seed
        self.source = source
        self.prompts = list(self.cfg.prompts)
        self.models: list[Which] = [m for m in self.cfg.models if m == "base" or source.has_ft]
        self.unsteered = {m: self._generate(m, None) for m in self.models}
        base_ppl = self.score(self.prompts, self.unsteered["base"]) if "base" in self.unsteered else [1.0]
        self.baseline = mean_log_perplexity(base_ppl)
        if not math.isfinite(self.baseline):
            self.baseline = 1.0
        self.unsteered_ppl = {m: self.score(self.prompts, t) for m, t in self.unsteered.items()}
        self.coherent = coherence or PerplexityCoherence(
            self.score, self.baseline, self.cfg.max_perplexity_ratio
        )

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
        with self.source.use("base") as lm:
            return answer_perplexity(lm, prompts, texts)

    def _generate(self, which: Which, vec: tuple[int, torch.Tensor] | None) -> list[str]:
        convs = [[{"role": "user", "content": p}] for p in self.prompts]
        with self.source.use(which) as lm:
            if vec is None:
                return generate_chat(lm, convs, self.cfg.max_new_tokens, temperature=0.0, seed=self.seed)
            with steer(lm.model, lm.sites, vec[0], vec[1]):
                return generate_chat(lm, convs, self.cfg.max_new_tokens, temperature=0.0, seed=self.seed)

    def run(self, layer: int, direction: torch.Tensor, residual_norm: float) -> Steering:
        unit = direction / direction.norm()
        rn = residual_norm if residual_norm > 0 else 1.0

        def gen_base(alpha: float) -> list[str]:
            return self._generate("base", (layer, alpha * rn * unit))

        alpha, trace = search_alpha(
            gen_base,
            self.coherent,
            self.prompts,
            self.cfg.alpha_min,
            self.cfg.alpha_max,
            self.cfg.search_steps,
        )
        gens: list[Generation] = []
        for m in self.models:
            for sign, a in (("0", 0.0), ("+", alpha), ("-", -alpha)):
                texts = self.unsteered[m] if sign == "0" else self._generate(m, (layer, a * rn * unit))
                ppl = self.unsteered_ppl[m] if sign == "0" else self.score(self.prompts, texts)
                for i, (p, t) in enumerate(zip(self.prompts, texts, strict=True)):
                    gens.append(
                        Generation(
                            id=f"steer:{m}:{sign}:{i}",
                            model=m,
                            prompt=p,
                            alpha=a,
                            text=t,
                            perplexity=ppl[i] if math.isfinite(ppl[i]) else None,
                        )
                    )
        return Steering(
            alpha=alpha, residual_norm=rn, generations=gens, search=trace, baseline_perplexity=self.baseline
        )
