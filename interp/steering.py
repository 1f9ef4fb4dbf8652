"""Steered generations and the bounded search for the steering strength.

Steering adds `alpha * residual_norm * unit` to the residual output of one layer at every position;
`alpha` is in units of the typical residual norm at that layer so that one scale means the same thing
across layers and models. The strength is the largest alpha in [alpha_min, alpha_max] at which the
steered generations (with +alpha and -alpha) stay coherent by the `CoherenceCheck` in use.

The search samples `search_samples` generations per prompt and sign at `search_temperature` (one greedy
sample is a poor witness: a strength that breaks most samples can leave the greedy one intact), and the
default check (`SampledCoherence`) fails repetition loops, which the perplexity proxy alone passes.
`llm_coherence` builds the check with an LLM judge (`evidence.coherence_judge`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from caft.errors import ConfigError
from caft.interp.coherence import (
    CoherenceCheck,
    LLMCoherenceJudge,
    PerplexityCoherence,
    RepetitionJudge,
    SampledCoherence,
    mean_log_perplexity,
)
from caft.interp.config import EvidenceConfig, SteeringConfig
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
        entry: dict[str, Any] = {"alpha": alpha}
        good = True
        for sign, key in ((1.0, "+"), (-1.0, "-")):
            good = coherent(prompts, generate(sign * alpha))
            details = getattr(coherent, "last", None)
            if isinstance(details, dict) and details:
                entry[key] = dict(details)
            if not good:
                break
        entry["coherent"] = good
        trace.append(entry)
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
        self.search_prompts = [p for p in self.prompts for _ in range(self.cfg.search_samples)]
        self.coherent = coherence or self._default_coherence()

    def _default_coherence(self) -> CoherenceCheck:
        """Repetition check per sample, and the perplexity of the samples against unsteered samples drawn
        the same way (sampled text has a higher perplexity than greedy text)."""
        base_samples = self._sample("base", None)
        baseline = mean_log_perplexity(self.score(self.search_prompts, base_samples))
        if not math.isfinite(baseline):
            baseline = self.baseline
        ppl = PerplexityCoherence(self.score, baseline, self.cfg.max_perplexity_ratio)
        return SampledCoherence([repetition_judge(self.cfg)], self.cfg.min_coherent_share, [ppl])

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

    def _sample(self, which: Which, vec: tuple[int, torch.Tensor] | None) -> list[str]:
        """`search_samples` sampled generations per prompt, in `search_prompts` order."""
        convs = [[{"role": "user", "content": p}] for p in self.search_prompts]
        t = self.cfg.search_temperature
        with self.source.use(which) as lm:
            if vec is None:
                return generate_chat(lm, convs, self.cfg.max_new_tokens, temperature=t, seed=self.seed)
            with steer(lm.model, lm.sites, vec[0], vec[1]):
                return generate_chat(lm, convs, self.cfg.max_new_tokens, temperature=t, seed=self.seed)

    def run(self, layer: int, direction: torch.Tensor, residual_norm: float) -> Steering:
        unit = direction / direction.norm()
        rn = residual_norm if residual_norm > 0 else 1.0

        def gen_base(alpha: float) -> list[str]:
            return self._sample("base", (layer, alpha * rn * unit))

        alpha, trace = search_alpha(
            gen_base,
            self.coherent,
            self.search_prompts,
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


def repetition_judge(cfg: SteeringConfig) -> RepetitionJudge:
    return RepetitionJudge(cfg.repetition_ngram, cfg.max_repeated_share)


def llm_coherence(cfg: EvidenceConfig, run_dir: Path | None) -> SampledCoherence | None:
    """The search's check with an LLM judge (`cfg.coherence_judge`) and the repetition check, when
    `steering.coherence` asks for one (`llm`, or `auto` with a judge configured); None for the offline
    default. Calls are cached and logged in `run_dir`."""
    mode, judge = cfg.steering.coherence, cfg.coherence_judge
    if mode == "perplexity" or (mode == "auto" and judge is None):
        return None
    if judge is None:
        raise ConfigError(
            "evidence.steering.coherence is `llm` but no judge is configured: set evidence.coherence_judge "
            "(e.g. {model: openai/gpt-4.1-mini}), or use `perplexity` for the offline check"
        )
    from caft.llm.client import LLMClient

    client = LLMClient.from_config(judge, run_dir=run_dir, stage="coherence")
    llm = LLMCoherenceJudge(client)
    return SampledCoherence([repetition_judge(cfg.steering), llm], cfg.steering.min_coherent_share)
