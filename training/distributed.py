"""Data-parallel training over several processes (DDP through HF accelerate), and the ablation under it.

    accelerate launch --num_processes 8 -m caft.app.cli train --config train.yaml    # or: torchrun ...

`caft.training.train` sees the launcher's environment (`WORLD_SIZE` > 1) and runs as one rank of the job:
accelerate sets up the process group (NCCL on GPUs, gloo on CPU) and wraps the model in
`DistributedDataParallel`. What stays the same as one process:

- the global batch: every optimizer step sees the same `batch_size * grad_accum` examples in the same order
  whatever the number of ranks; each micro-batch is split across the ranks, and each rank's loss is weighted
  by its share of the micro-batch's loss units (label tokens, or examples), so the averaged gradient is the
  one-process gradient (up to float summation order);
- the ablation: attached with forward hooks to the layers of the wrapped model on every rank, for the whole
  loop (DDP calls the inner model's modules, so the hooks run in each rank's forward); the one-process loop
  uses the nnsight trace, which computes the same edit. Under gradient checkpointing transformers recomputes
  a layer's `forward` only, so the hook on its output stays outside the recomputed region: the edit's own
  backward (the projection, which keeps only Q) is reused and the next layer recomputes from the ablated
  output saved at the boundary;
- the files: rank 0 writes the log, checkpoints and `final/` (the same plain peft adapter or model); every
  rank loads the checkpoint on resume. A run killed on any rank resumes from its newest checkpoint, with any
  number of ranks.

FSDP (models that do not fit one device) is selected in accelerate's launch config; caft's checkpoints and
final save read the parameters by name on rank 0, which holds for DDP only, so an FSDP launch is refused
with an explanation (see docs/scaling.md for what to use instead).
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

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()

    def wrap(self, model: nn.Module) -> Any:
        """The model wrapped for data-parallel training (the same module when alone)."""
        return self.accelerator.prepare(model) if self.enabled else model

    def no_sync(self, wrapped: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce of this backward unless `sync` (accumulation micro-steps)."""
        if not self.enabled or sync:
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
    is the model config's: `cpu` (or no CUDA) makes a gloo job on CPU, else one GPU per rank."""
    world = launched_world_size()
    if world <= 1:
        return Dist()
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
    if acc.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        raise ConfigError(
            f"accelerate is configured for {acc.distributed_type.value}; caft trains with DDP (multi_gpu or "
            "multi_cpu) only: its checkpoints and final adapter are read by parameter name on rank 0, "
            "which sharded (FSDP/DeepSpeed) parameters are not. Relaunch with `accelerate launch --multi_gpu` "
            "(see docs/scaling.md for models too large for one device)"
        )
    return Dist(rank=acc.process_index, world=acc.num_processes, accelerator=acc)


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank `rank`'s part of one micro-batch: every `world`-th item from `rank` on."""
    return list(items[rank::world])


@contextlib.contextmanager
def attach_ablation(model: nn.Module, sites: Sites, abl: Ablation | None) -> Iterator[None]:
    """`abl` on the residual stream of its layers through forward hooks, for the forwards run inside (a DDP
    wrapper's forward included)."""
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
