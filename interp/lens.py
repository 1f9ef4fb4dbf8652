"""Reading and pushing along a direction: logit lens, steering hook, perplexity, steering-strength search.

Steering adds `alpha * residual_norm * unit` to the residual output of one layer at every position, with a
plain forward hook (`steer`); `alpha` is in units of the typical residual norm at that layer so that one
scale means the same thing across layers and models. The strength is the largest alpha in a bounded range
whose generations stay coherent; the offline coherence proxy is the perplexity of the generations under the
unsteered base model, relative to unsteered generations. Any `CoherenceCheck` (e.g. an LLM judge) can be
plugged in instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from caft.interp.schema import LogitLens, TokenScore

if TYPE_CHECKING:
    import torch
    from torch import nn

    from caft.chat import TemplateChoice
    from caft.models import LoadedModel
    from caft.sites import Sites


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token as readable text (decoded; the raw token string when decoding gives nothing or a partial
    UTF-8 sequence)."""
    text: str = tokenizer.decode([int(token_id)])
    if not text or "\ufffd" in text:
        raw = tokenizer.convert_ids_to_tokens(int(token_id))
        return str(raw)
    return text


# ---- logit lens ------------------------------------------------------------------------------------------


def lens_logits(model: nn.Module, sites: Sites, direction: torch.Tensor) -> torch.Tensor:
    """(V,) logits of the direction read through the final norm and the unembedding."""
    import torch

    head = sites.unembed(model)
    if head is None:
        raise ValueError("the logit lens needs a causal LM (this model has no unembedding)")
    norm = sites.final_norm(model)
    param = next(head.parameters())
    x = direction.to(device=param.device, dtype=param.dtype)[None, None, :]  # (1, 1, d)
    with torch.no_grad():
        if norm is not None:
            x = norm(x)
        logits: torch.Tensor = head(x)[0, 0].float()
    return logits


def logit_lens(loaded: LoadedModel, direction: torch.Tensor, k: int = 15) -> LogitLens:
    """Top promoted and suppressed tokens of the direction."""
    logits = lens_logits(loaded.model, loaded.sites, direction)
    k = min(k, logits.numel())
    top = logits.topk(k)
    bottom = (-logits).topk(k)
    tok = loaded.tokenizer
    return LogitLens(
        promoted=[
            TokenScore(token=token_text(tok, int(i)), value=float(v))
            for v, i in zip(top.values, top.indices, strict=True)
        ],
        suppressed=[
            TokenScore(token=token_text(tok, int(i)), value=float(-v))
            for v, i in zip(bottom.values, bottom.indices, strict=True)
        ],
    )


# ---- steering --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def steer(model: nn.Module, sites: Sites, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Add `vector` (d,) to the residual output of `layer` at every position while the context is open."""

    def hook(_mod: nn.Module, _inp: Any, output: Any) -> Any:
        h = sites.hidden(output)
        return sites.replace_hidden(output, h + vector.to(device=h.device, dtype=h.dtype))

    handle = sites.layer_module(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def answer_perplexity(
    loaded: LoadedModel, prompts: Sequence[str], answers: Sequence[str], template: str | None = None
) -> list[float]:
    """Perplexity of each answer (as the assistant turn after its prompt) under `loaded` as it runs now.
    An empty answer counts as incoherent (inf)."""
    import torch

    from caft.chat import ChatFormatter

    fmt = ChatFormatter(loaded.tokenizer, cast("TemplateChoice", template or loaded.config.chat.template))
    out: list[float] = []
    for prompt, answer in zip(prompts, answers, strict=True):
        if not answer.strip():
            out.append(math.inf)
            continue
        enc = fmt.encode([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        ids = torch.tensor([enc.input_ids], device=loaded.device)
        mask = torch.tensor(enc.assistant_mask[1:], device=loaded.device)  # targets of positions 0..T-2
        with torch.no_grad():
            logits = cast(Any, loaded.model)(input_ids=ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        if not bool(mask.any()):
            out.append(math.inf)
            continue
        out.append(float(torch.exp(nll[mask].mean())))
    return out


class CoherenceCheck(Protocol):
    """Decides whether a set of generations is coherent (offline: perplexity; later: an LLM judge)."""

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
    finite = [math.log(v) for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(finite) / len(finite)) if finite else math.inf


def search_alpha(
    generate: Any,
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
