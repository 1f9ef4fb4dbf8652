"""Data-parallel training over several processes through HF accelerate, replicated (DDP) or sharded
(FSDP2), and the ablation under it.

    accelerate launch --num_processes 8 -m caft.app.cli train --config train.yaml    # or: torchrun ...
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 -m caft.app.cli train ...   # sharded
    ACCELERATE_USE_FSDP=true torchrun --nproc_per_node 8 -m caft.app.cli train ...             # the same

`caft.training.train` sees the launcher's environment (`WORLD_SIZE` > 1) and runs as one rank of the job:
accelerate sets up the process group (NCCL on GPUs, gloo on CPU) and, for DDP, wraps the model in
`DistributedDataParallel`. The launcher's FSDP setting (`ACCELERATE_USE_FSDP=true`, which `accelerate launch
--use_fsdp` and an accelerate config with `distributed_type: FSDP` set) selects sharding instead; caft then
shards the model itself with FSDP2's `fully_shard` (`caft.training.sharded`: one group per decoder layer and
one at the root) rather than through accelerate's FSDP plugin, for two reasons: accelerate ignores FSDP on
CPU (an `Accelerator(cpu=True)` with an FSDP plugin is a plain multi_cpu DDP job, so its path could not be
tested here), while `fully_shard` runs on a gloo CPU mesh exactly as on NCCL; and accelerate's FSDP2 prepare
needs the optimizer and replaces its parameters, where caft keeps its own loop, optimizer and files. So the
plugin's other settings (wrap policy, CPU offload, mixed precision, state dict type) do not apply: caft writes
whole-tensor files and applies its own bf16 autocast; `--fsdp_version 1` is refused. What stays the same as
one process:

- the global batch: every optimizer step sees the same `batch_size * grad_accum` examples in the same order
  whatever the number of ranks; each micro-batch is split across the ranks, and each rank's loss is weighted
  by its share of the micro-batch's loss units (label tokens, or examples), so the averaged gradient is the
  one-process gradient (up to float summation order). Under FSDP each backward reduce-scatters its
  gradients (no `no_sync` for accumulation micro-steps: the gradients stay sharded), and gradient clipping
  takes the global norm over the shards;
- the ablation: attached with forward hooks to the layers of the (wrapped or sharded) model on every rank, for
  the whole loop (DDP calls the inner model's modules, FSDP shards parameters, not activations, so each
  rank's hook sees its examples' full hidden state); the one-process loop uses the nnsight trace, which
  computes the same edit. Under gradient checkpointing transformers recomputes a layer's `forward` only, so
  the hook on its output stays outside the recomputed region: the edit's own backward (the projection, which
  keeps only Q) is reused and the next layer recomputes from the ablated output saved at the boundary;
- the files: rank 0 writes the log, checkpoints and `final/` (the same plain peft adapter or model); under
  FSDP the whole tensors are gathered to rank 0's CPU first. Every rank loads the checkpoint on resume (a
  sharded rank keeps its shard). A run killed on any rank resumes from its newest checkpoint, with any number
  of ranks, sharded or not (the files are the same).

Under FSDP on GPUs each rank loads the model on its CPU (in the dtype its GPU would get) and keeps only its
shard on the GPU after sharding; the references of modes `mean` and `penalty` are computed before sharding,
on that CPU copy. The encoder classifier objective is refused (it is small: use DDP); DeepSpeed and other
accelerate modes are refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from caft.errors import CaftError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from caft.config import ModelConfig
    from caft.sites import Sites
    from caft.training.ablation import Ablation

T = TypeVar("T")

__all__ = ["Dist", "attach_ablation", "launched_world_size", "setup", "shard"]


def launched_world_size() -> int:
    """The number of processes a launcher (accelerate launch, torchrun) started this job with (1: none)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@dataclass
class Dist:
    """This process's place in the job; a one-process job when `accelerator` is None."""

    rank: int = 0
    world: int = 1
    accelerator: Any = None
    fsdp: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()

    def load_config(self, mcfg: ModelConfig) -> ModelConfig:
        """The model config this rank loads with: its own device (`mcfg`'s); under FSDP on a GPU the CPU
        instead, in the dtype the GPU would get, so that no GPU holds the whole model (`wrap` moves each
        rank's shard onto its GPU)."""
        if not self.fsdp or self.accelerator.device.type == "cpu":
            return mcfg
        from caft.models import resolve_device, resolve_dtype

        dtype = resolve_dtype(mcfg.dtype, resolve_device(mcfg.device))
        return mcfg.model_copy(update={"device": "cpu", "dtype": str(dtype).removeprefix("torch.")})

    def wrap(self, model: nn.Module, sites: Sites) -> Any:
        """The model wrapped for data-parallel training: a DDP wrapper, or under FSDP the same module sharded
        in place onto this rank's device (its parameters are new: make the optimizer after); the same module
        when alone. `sites`: the model's, read before."""
        if not self.enabled:
            return model
        if self.fsdp:
            from caft.training.sharded import shard_model

            shard_model(model, sites, self.accelerator.device, self.world)
            return model
        return self.accelerator.prepare(model)

    def no_sync(self, wrapped: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce of this backward unless `sync` (DDP accumulation micro-steps; FSDP
        reduce-scatters every backward, so that its gradients stay sharded)."""
        if not self.enabled or sync or self.fsdp:
            return contextlib.nullcontext()
        cm: contextlib.AbstractContextManager[Any] = self.accelerator.no_sync(wrapped)
        return cm

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks."""
        if not self.enabled:
            return list(values)
        import torch

        t = torch.tensor(list(values), dtype=torch.float64, device=self.accelerator.device)
        return [float(v) for v in self.accelerator.reduce(t, reduction="sum").cpu()]

    def on_main(self, fn: Callable[[], T], placeholder: T) -> T:
        """`fn()` run on rank 0 only (e.g. it rewrites a file), and its answer, or the `CaftError` it
        raised, on every rank; the other ranks hold `placeholder` until rank 0's answer arrives."""
        if not self.enabled:
            return fn()
        answer: T | CaftError
        try:
            answer = fn() if self.is_main else placeholder
        except CaftError as e:
            answer = e
        answer = self.from_main(answer)
        if isinstance(answer, CaftError):
            raise answer
        return answer

    def from_main(self, value: T) -> T:
        """Rank 0's `value` on every rank (a picklable object)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        out: T = box[0]
        return out


def setup(device: str = "auto") -> Dist:
    """The job this process belongs to: a one-process `Dist` unless a launcher started several. `device`
    is the model config's: `cpu` (or no CUDA) makes a gloo job on CPU, else one GPU per rank. The launcher's
    FSDP setting (`ACCELERATE_USE_FSDP`) makes it a sharded job."""
    world = launched_world_size()
    if world <= 1:
        return Dist()
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "accelerate is configured for DeepSpeed, which caft does not train with (its checkpoints and final "
            "save are caft's own); relaunch with DDP (`accelerate launch --multi_gpu`) or FSDP2 "
            "(`accelerate launch --use_fsdp --fsdp_version 2`, see docs/scaling.md)"
        )
    fsdp = _env_flag("ACCELERATE_USE_FSDP")
    if fsdp and os.environ.get("FSDP_VERSION", "2").strip() != "2":
        raise ConfigError(
            f"accelerate is configured for FSDP version {os.environ['FSDP_VERSION']}; caft shards with FSDP2 "
            "(fully_shard) only: relaunch with `accelerate launch --use_fsdp --fsdp_version 2` (or set "
            "fsdp_version: 2 in the accelerate config)"
        )
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType
    except ImportError:
        raise ConfigError(
            f"this process was launched as one of {world} ranks (WORLD_SIZE={world}), which needs HF "
            "accelerate: pip install 'caft[scale]'"
        ) from None
    # caft applies its own autocast (optim.precision); accelerate's would run a second one
    import torch

    acc = Accelerator(mixed_precision="no", cpu=device == "cpu" or not torch.cuda.is_available())
    # on CPU accelerate ignores its FSDP setting (multi_cpu); caft shards either way
    allowed = {DistributedType.MULTI_GPU, DistributedType.MULTI_CPU} | (
        {DistributedType.FSDP} if fsdp else set()
    )
    if acc.distributed_type not in allowed:
        raise ConfigError(
            f"accelerate is configured for {acc.distributed_type.value}; caft trains with DDP (multi_gpu or "
            "multi_cpu) or FSDP2 only. Relaunch with `accelerate launch --multi_gpu` or `accelerate launch "
            "--use_fsdp --fsdp_version 2` (see docs/scaling.md)"
        )
    return Dist(rank=acc.process_index, world=acc.num_processes, accelerator=acc, fsdp=fsdp)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank `rank`'s part of one micro-batch: every `world`-th item from `rank` on."""
    return list(items[rank::world])


@contextlib.contextmanager
def attach_ablation(model: nn.Module, sites: Sites, abl: Ablation | None) -> Iterator[None]:
    """`abl` on the residual stream of its layers through forward hooks, for the forwards run inside (a DDP
    wrapper's forward, or a sharded model's, included)."""
    if abl is None or not abl.layers:
        yield
        return
    handles = []

    def hook_for(layer: int) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> Any:
            return sites.replace_hidden(output, abl.apply(sites.hidden(output), layer))

        return hook

    try:
        for layer in abl.layers:
            handles.append(sites.layer_module(model, layer).register_forward_hook(hook_for(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def loss_units(batch: dict[str, torch.Tensor]) -> int:
    """What the objective's loss averages over: predicted label tokens (chat), else examples."""
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != -100).sum())
    return int(batch["input_ids"].shape[0])
