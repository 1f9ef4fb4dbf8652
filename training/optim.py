"""The optimizer side of a run: how many steps it takes, AdamW with its learning-rate schedule, and gradient
clipping."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from caft.training.config import TrainConfig

__all__ = ["clip_gradients", "make_optimizer", "plan_steps"]


def plan_steps(cfg: TrainConfig, n_examples: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches per epoch) for `n_examples` training examples."""
    micro_per_epoch = math.ceil(n_examples / cfg.optim.batch_size)
    total = max(1, math.ceil(cfg.optim.epochs * micro_per_epoch / cfg.optim.grad_accum))
    if cfg.optim.max_steps is not None:
        total = cfg.optim.max_steps
    return total, micro_per_epoch


def make_optimizer(cfg: TrainConfig, model: Any, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters (a classifier head at `optim.head_lr`) and its schedule: linear
    warmup, then constant or linear decay to 0 at `total_steps`."""
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups: list[dict[str, Any]] = [{"params": body, "lr": cfg.optim.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.optim.head_lr or cfg.optim.lr})
    opt = torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    warmup = cfg.optim.warmup_steps
    if warmup is None:
        warmup = round((cfg.optim.warmup_ratio or 0.0) * total_steps)
    linear = cfg.optim.schedule == "linear"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not linear:
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clip_gradients(cfg: TrainConfig, model: Any) -> float | None:
    """Clip the global gradient norm as configured; returns the norm before clipping. `clip_grad_norm_`'s
    two halves: a sharded model's norm is a DTensor of partial norms, made whole (over the ranks) first."""
    if cfg.optim.max_grad_norm is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    full = getattr(norm, "full_tensor", None)  # a DTensor (FSDP)
    if full is not None:
        norm = full()
    torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.max_grad_norm, norm)
    return float(norm)
