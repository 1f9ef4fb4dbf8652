"""Reading and pushing along a direction: logit lens, steering hook, perplexity of answers.

Steering adds `vector` to the residual output of one layer at every position, with a plain forward hook
(`steer`). The strength search that uses it is in `caft.interp.steering`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from caft.chat import ChatFormatter
from caft.interp.schema import LogitLens, TokenScore
from caft.models import LoadedModel
from caft.sites import Sites

if TYPE_CHECKING:
    from caft.chat import TemplateChoice


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
