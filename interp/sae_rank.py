"""SAE latents ranked three ways over the analysed tokens (top N per layer by |score|):

mean_diff     mean over tokens of encode(ft) - encode(base)
sae_diff      mean over tokens of encode(ft - base)
attribution   sum over tokens of (W_dec[f] . dLoss/dx) * encode(x)[f], the fine-tuning loss being the
              next-token loss on the analysed tokens (causal LMs)
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from caft.errors import DataError, ModelError
from caft.interp.collect import PassState, collect_diffs
from caft.interp.inputs import TokenBatch
from caft.interp.sae_load import LoadedSAE
from caft.interp.schema import Candidate, candidate_id
from caft.interp.source import ActivationSource, Which

log = logging.getLogger(__name__)


def attribution_batch(
    model: nn.Module,
    sites: Any,
    saes: Sequence[LoadedSAE],
    batch: TokenBatch,
    device: torch.device,
    special_ids: Collection[int] = (),
) -> dict[str, torch.Tensor]:
    """For one batch: {sae name: (d_sae,) sum over counted tokens of (W_dec[f] . dLoss/dx) * encode(x)[f]},
    the loss being the mean next-token cross-entropy on the batch's selected tokens.

    Counted tokens: non-pad, not position 0, not a special token (BOS / attention-sink residuals are orders
    of magnitude larger than the rest, and SAEs are usually trained without them). The gradient is taken
    w.r.t. the residual only: each hooked output gets a zero leaf added (`h + 0`), so no parameter needs
    `requires_grad` (a frozen model or a frozen peft adapter works) and no parameter gradient is computed.
    """
    layers = sorted({s.layer for s in saes})
    leaves: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(_mod: nn.Module, _inp: Any, output: Any) -> Any:
            h = sites.hidden(output)
            # A zero leaf rather than h.detach(): the graph stays connected, so a shallower hooked layer
            # still gets the gradient that flows through the deeper ones.
            leaf = torch.zeros_like(h, requires_grad=True)
            leaves[layer], outputs[layer] = leaf, h.detach()
            return sites.replace_hidden(output, h + leaf)

        return hook

    ids = batch.input_ids.to(device)
    att = batch.attention_mask.to(device)
    labels = ids.masked_fill(~batch.select.to(device), -100)
    if not bool((labels[:, 1:] != -100).any()):  # no next-token target: nothing to attribute
        return {s.name: torch.zeros(s.d_sae) for s in saes}
    for layer in layers:
        handles.append(sites.layer_module(model, layer).register_forward_hook(make_hook(layer)))
    try:
        with torch.enable_grad():
            out = cast(Any, model)(input_ids=ids, attention_mask=att)
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            grads = torch.autograd.grad(loss, [leaves[layer] for layer in layers], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    keep = att.bool()
    keep[:, 0] = False
    if special_ids:
        keep &= ~torch.isin(ids, torch.tensor(sorted(special_ids), dtype=ids.dtype, device=ids.device))
    grad_of = dict(zip(layers, grads, strict=True))
    result: dict[str, torch.Tensor] = {}
    for s in saes:
        grad = grad_of[s.layer]
        if grad is None:
            raise ModelError(f"no gradient reached layer {s.layer}; does the loss depend on that layer?")
        x = outputs[s.layer][keep].float()  # (N, d)
        g = grad[keep].float()  # (N, d)
        z = s.encode(x)  # (N, d_sae)
        gd = g @ s.W_dec.float().to(g.device).T  # (N, d_sae) = W_dec[f] . grad
        result[s.name] = (gd * z.to(gd.device)).sum(0).cpu()
    return result


def rank_latents(
    source: ActivationSource,
    saes: Sequence[LoadedSAE],
    batches: Sequence[TokenBatch],
    rankings: Sequence[str],
    attribution_model: str = "ft",
    state_path: Path | None = None,
    checkpoint_every: int = 50,
) -> dict[str, dict[str, torch.Tensor]]:
    """{sae name: {score name: (d_sae,)}} over all batches: `mean_diff`, `sae_diff`, `attribution`, plus
    `mean_base` and `mean_ft` (mean latent activations). With `state_path`, the running sums are saved
    every `checkpoint_every` batches and a rerun resumes from there."""
    layers = sorted({s.layer for s in saes})
    want_attr = "attribution" in rankings and source.is_causal_lm
    if "attribution" in rankings and not source.is_causal_lm:
        log.info("attribution ranking skipped: it needs the next-token loss of a causal LM")
    names = ("mean_base", "mean_ft", "sae_diff", "attribution")
    sums = {s.name: {k: torch.zeros(s.d_sae, dtype=torch.float64) for k in names} for s in saes}
    key = {"saes": [s.name for s in saes], "n_batches": len(batches), "rankings": list(rankings)}
    progress = {"acts": 0, "attr": 0, "n_tokens": 0}
    state = PassState(state_path, key, "sae ranking")
    saved = state.resume()
    if saved is not None:
        sums, progress = saved["sums"], dict(saved["progress"])

    def checkpoint() -> None:
        state.save(sums=sums, progress=progress)

    bar = tqdm(total=len(batches), initial=progress["acts"], desc="sae: activations", unit="batch")
    for db in collect_diffs(source, batches[progress["acts"] :], layers):
        progress["n_tokens"] += db.n_tokens
        for s in saes:
            base = db.base[s.layer]
            zb, zf = s.encode(base), s.encode(base + db.diffs[s.layer])
            sums[s.name]["mean_base"] += zb.double().sum(0).cpu()
            sums[s.name]["mean_ft"] += zf.double().sum(0).cpu()
            if "sae_diff" in rankings:
                sums[s.name]["sae_diff"] += s.encode(db.diffs[s.layer]).double().sum(0).cpu()
        progress["acts"] = db.batch.index + 1
        bar.update(progress["acts"] - bar.n)
        if progress["acts"] % checkpoint_every == 0:
            checkpoint()
    progress["acts"] = len(batches)
    bar.close()
    n_tokens = progress["n_tokens"]
    if n_tokens == 0:
        raise DataError("no analysed tokens for the SAE rankings")
    if want_attr:
        which: Which = "ft" if attribution_model == "ft" else "base"
        special = set(source.tokenizer.all_special_ids)
        bar = tqdm(total=len(batches), initial=progress["attr"], desc="sae: attribution", unit="batch")
        for i in range(progress["attr"], len(batches)):
            batch = batches[i]
            if batch.n_selected > 0:
                with source.use(which) as lm:
                    part = attribution_batch(lm.model, lm.sites, saes, batch, lm.device, special)
                for name, v in part.items():
                    sums[name]["attribution"] += v.double()
            progress["attr"] = i + 1
            bar.update(1)
            if progress["attr"] % checkpoint_every == 0:
                checkpoint()
        bar.close()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for s in saes:
        mb, mf = sums[s.name]["mean_base"] / n_tokens, sums[s.name]["mean_ft"] / n_tokens
        out[s.name] = {"mean_base": mb, "mean_ft": mf, "mean_diff": mf - mb}
        if "sae_diff" in rankings:
            out[s.name]["sae_diff"] = sums[s.name]["sae_diff"] / n_tokens
        if want_attr:
            out[s.name]["attribution"] = sums[s.name]["attribution"]
    return out


def candidates_from_scores(
    sae: LoadedSAE, scores: dict[str, torch.Tensor], rankings: Sequence[str], top_n: int
) -> tuple[list[Candidate], dict[str, torch.Tensor]]:
    """Union of the top-N latents (by |score|) of each ranking; each candidate carries every score."""
    ranks: dict[int, dict[str, int]] = {}
    for r in rankings:
        if r not in scores:
            continue
        v = scores[r].abs()
        n = min(top_n, v.numel())
        for rank, idx in enumerate(v.topk(n).indices.tolist()):
            ranks.setdefault(int(idx), {})[r] = rank
    dirs_all = sae.directions()
    order = sorted(ranks, key=lambda i: (min(ranks[i].values()), i))
    cands: list[Candidate] = []
    dirs: dict[str, torch.Tensor] = {}
    for latent in order:
        cid = candidate_id("sae", sae.layer, latent)
        cands.append(
            Candidate(
                id=cid,
                kind="sae",
                layer=sae.layer,
                index=latent,
                source=f"sae:{sae.name}",
                scores={k: float(v[latent]) for k, v in scores.items()},
                ranks=ranks[latent],
                sae=sae.name,
            )
        )
        dirs[cid] = dirs_all[latent].cpu()
    return cands, dirs
