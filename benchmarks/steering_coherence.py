"""Does the steering-strength search's coherence check accept repetition loops? Gemma-3-270M (built-in), random
unit directions at one layer, steered at alpha x the typical residual norm. For each strength: the old check
(one greedy sample per prompt, mean perplexity under the unsteered model <= 3x the greedy baseline) and the
new one (3 samples per prompt at T=1, >= 75% of them free of repetition loops, perplexity against sampled
baselines). Prints a markdown table.

    CAFT_CACHE_DIR=/work/cache nice python benchmarks/steering_coherence.py --directions 3 --alphas 2,4,8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from caft.config import ModelConfig
from caft.interp.coherence import (
    PerplexityCoherence,
    RepetitionJudge,
    SampledCoherence,
    mean_log_perplexity,
    repetition,
)
from caft.interp.config import SteeringConfig
from caft.interp.corpus import BUILTIN_GENERIC, builtin_documents
from caft.interp.lens import answer_perplexity, steer
from caft.models import generate_chat, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    ap.add_argument("--directions", type=int, default=3)
    ap.add_argument("--alphas", default="2,4,8")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {"name_or_path": args.model, "device": "cpu", "dtype": "float32", "chat": {"template": "chatml"}}
    )
    lm = load_model(cfg, padding_side="left")
    layer = args.layer if args.layer is not None else lm.sites.n_layers // 2
    prompts = list(SteeringConfig().prompts)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    many = [p for p in prompts for _ in range(args.samples)]
    many_convs = [[{"role": "user", "content": p}] for p in many]

    norms: list[torch.Tensor] = []
    module = lm.sites.layer_module(lm.model, layer)
    hook = module.register_forward_hook(
        lambda _m, _i, out: norms.append(lm.sites.hidden(out)[0, 1:].norm(dim=-1))
    )
    with torch.no_grad():
        for doc in builtin_documents(BUILTIN_GENERIC)[:16]:
            lm.model(torch.tensor([lm.tokenizer(doc)["input_ids"][:64]]))
    hook.remove()
    rn = float(torch.cat(norms).median())

    def gen(vec: torch.Tensor | None, sampled: bool) -> list[str]:
        c, t = (many_convs, 1.0) if sampled else (convs, 0.0)
        if vec is None:
            return generate_chat(lm, c, args.tokens, temperature=t, seed=0)
        with steer(lm.model, lm.sites, layer, vec):
            return generate_chat(lm, c, args.tokens, temperature=t, seed=0)

    def score(ps: Sequence[str], texts: Sequence[str]) -> list[float]:
        return answer_perplexity(lm, ps, texts)

    t0 = time.time()
    greedy0, sampled0 = gen(None, False), gen(None, True)
    greedy_base = mean_log_perplexity(score(prompts, greedy0))
    sampled_base = mean_log_perplexity(score(many, sampled0))
    old = PerplexityCoherence(score, greedy_base, 3.0)
    new = SampledCoherence([RepetitionJudge()], 0.75, [PerplexityCoherence(score, sampled_base, 3.0)])
    loop_free = sum(repetition(t) <= 0.5 for t in sampled0) / len(sampled0)
    print(
        f"model {args.model}, layer {layer}, typical residual norm {rn:.1f}; unsteered: perplexity greedy "
        f"{greedy_base:.2f}, sampled {sampled_base:.2f}; max repetition greedy "
        f"{max(repetition(t) for t in greedy0):.2f}, loop-free share of samples {loop_free:.2f}\n"
    )
    for t in greedy0:
        print(f"unsteered greedy: {t[:120]!r}")
    print(
        "| direction | alpha | old: coherent | greedy: max repetition | new: coherent | new: loop-free share |"
    )
    print("|---|---|---|---|---|---|")
    example = ""
    gen_dirs = torch.Generator().manual_seed(0)
    for d in range(args.directions):
        unit = torch.randn(lm.sites.d_model, generator=gen_dirs)
        unit = unit / unit.norm()
        for alpha in (float(a) for a in args.alphas.split(",")):
            vec = alpha * rn * unit
            greedy = gen(vec, False)
            rep = max(repetition(t) for t in greedy)
            old_ok = old(prompts, greedy)
            new_ok = new(many, gen(vec, True))
            if old_ok and rep > 0.5 and not example:
                example = next(t for t in greedy if repetition(t) > 0.5)
            print(f"| {d} | {alpha:g} | {old_ok} | {rep:.2f} | {new_ok} | {new.last['coherent_share']:.2f} |")
    print(f"\n{time.time() - t0:.0f} s")
    if example:
        print(f"\nA greedy sample the old check accepted: {example[:300]!r}")


if __name__ == "__main__":
    main()
