"""The autograd Functions behind the linear ablation modes (`caft.training.ablation`).

The projection P = I - QQ^T is symmetric, so its backward is P applied to the incoming gradient: only Q
needs saving, never the activation h. Plain autograd would keep h (B, T, d) alive per ablated layer; these
keep nothing of size B x T.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DetachedFn", "ProjectFn", "ProjectGradFn", "remove_span"]


def remove_span(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x - (xQ)Q^T as one fused matmul-and-subtract over the flattened positions, in x's dtype (under
    autocast too: rounding all of x to bf16 would change more than its span(Q) part)."""
    flat = x.reshape(-1, x.shape[-1])  # (N, d)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.addmm(flat, flat @ q.to(x.dtype), q.T.to(x.dtype), alpha=-1).view(x.shape)


class ProjectFn(torch.autograd.Function):
    """Forward: h - (hQ)Q^T (+ shift). Backward: g - (gQ)Q^T."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, q: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(q)
        out = remove_span(h, q)  # (..., d)
        return out.add_(shift) if shift is not None else out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (q,) = ctx.saved_tensors
        return remove_span(g, q.to(g.dtype)), None, None


class DetachedFn(torch.autograd.Function):
    """Forward: h - (hQ)Q^T. Backward: identity (the projection is a constant offset to autograd)."""

    @staticmethod
    def forward(_ctx: Any, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return remove_span(h, q)

    @staticmethod
    def backward(_ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


class ProjectGradFn(torch.autograd.Function):
    """Forward: identity. Backward: g - (gQ)Q^T."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q)
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (q,) = ctx.saved_tensors
        return remove_span(g, q.to(g.dtype)), None
