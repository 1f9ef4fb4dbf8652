"""Fully sharded data parallel training (FSDP2, `torch.distributed.fsdp.fully_shard`): sharding the model,
and the whole-tensor state dicts that caft's checkpoints and `final/` are written from and read back into.

Sharding: one FSDP group per decoder layer (the layers of `caft.sites`) and one at the root (embeddings,
final norm, LM head, and under LoRA the peft wrapper). Each parameter becomes a DTensor sharded on its first
dimension over the ranks; a group's parameters are all-gathered for its forward and its backward and freed
after, and its gradients are reduce-scattered (averaged over the ranks, as DDP's all-reduce). Activations
are not sharded: a forward hook on a layer sees the full hidden state, so the ablation hooks of
`caft.training.distributed.attach_ablation` run unchanged on every rank.

Files: the formats are the one-process ones, so that a run can resume with any number of ranks, sharded or
not. The functions below are collectives (every rank calls them, in the same order); rank 0 receives whole
tensors on its CPU and the other ranks empty dicts:

- the trainable parameters (`get_model_state_dict(full_state_dict, cpu_offload, ignore_frozen_params)`:
  under LoRA only the adapter is gathered, not the frozen base);
- the optimizer state (`get_optimizer_state_dict`), keyed by parameter name there, renumbered to the
  integer ids of `Optimizer.state_dict()`: the position of each parameter in the optimizer, which is the
  same in every mode (`make_optimizer` takes them in `named_parameters` order, and sharding keeps names and
  order);
- `final/`: the adapter (LoRA) or the whole model, handed to `save_pretrained(state_dict=...)`.

Resume goes the other way: every rank reads the whole files and `set_model_state_dict` /
`set_optimizer_state_dict` keep each rank's shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from caft.sites import Sites

__all__ = [
    "final_state",
    "full_optimizer_state",
    "full_trainable_state",
    "is_sharded",
    "load_full_state",
    "shard_model",
]


def shard_model(model: nn.Module, sites: Sites, device: torch.device, world: int) -> None:
    """Shard `model` in place over `world` ranks on `device`'s type (a CPU mesh runs over gloo): one group
    per decoder layer, then the root. Parameters are replaced by sharded ones, so an optimizer is made after.
    `sites` must be the model's, read before sharding (sharding renames the classes that `Sites.of` reads)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in range(sites.n_layers):
        fully_shard(sites.layer_module(model, layer), mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: Any) -> bool:
    """Whether `model` was sharded by `shard_model` (its parameters are DTensors)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(model, FSDPModule)


def _options(cpu_offload: bool = False, ignore_frozen_params: bool = False, strict: bool = True) -> Any:
    """Whole tensors (`full_state_dict`); `cpu_offload`: gathered to rank 0's CPU only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=True,
        cpu_offload=cpu_offload,
        ignore_frozen_params=ignore_frozen_params,
        strict=strict,
    )


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name, whole, on rank 0's CPU ({} on the other ranks). A collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd: dict[str, Any] = get_model_state_dict(
        model, options=_options(cpu_offload=True, ignore_frozen_params=True)
    )
    if not sd:
        return {}
    # `named_parameters` names each tied parameter once, like the one-process checkpoint
    return {n: sd[n].contiguous() for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` as one process holds it (integer parameter ids, whole tensors) on rank 0's
    CPU; {} on the other ranks. A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd: dict[str, Any] = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not sd:
        return {}
    ids: dict[str, int] = {}
    groups = []
    for group in sd["param_groups"]:
        for name in group["params"]:
            ids[name] = len(ids)
        groups.append({**group, "params": [ids[n] for n in group["params"]]})
    return {"state": {ids[n]: v for n, v in sd["state"].items()}, "param_groups": groups}


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load whole-tensor `params` (a subset of the model's, by name) and a one-process
    `optimizer.state_dict()` into the sharded `model` and its optimizer; every rank passes the same dicts
    and keeps its shard. A collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, dict(params), options=_options(strict=False))
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named: dict[str, Any] = {
        "state": {names[int(i)]: v for i, v in optimizer_state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in optimizer_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, named, options=_options())


def final_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """What `final/` is written from when `model` is sharded: the trainable parameters (`trainable_only`:
    a LoRA adapter's), else the whole state dict, on rank 0 ({} elsewhere). None when `model` is not
    sharded (it saves its own state). A collective."""
    if not is_sharded(model):
        return None
    if trainable_only:
        return full_trainable_state(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd: dict[str, Any] = get_model_state_dict(model, options=_options(cpu_offload=True))
    return sd
