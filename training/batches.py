"""The micro-batches of a run, found from their index alone: epoch-major, each epoch in a seeded order, so a
resumed run (with any number of ranks) sees the same batches in the same order."""

from __future__ import annotations

from typing import TYPE_CHECKING

from caft.training.data import Tokenized, batch_order, collate
from caft.training.distributed import loss_units, shard

if TYPE_CHECKING:
    import torch

    from caft.training.config import TrainConfig

__all__ = ["MicroBatches"]


class MicroBatches:
    """Micro-batch `index` of the whole run (epoch-major), collated; the order of each epoch is seeded, so
    a resumed run finds the same batches from the index alone."""

    def __init__(self, items: list[Tokenized], cfg: TrainConfig, per_epoch: int, pad_id: int) -> None:
        self.items, self.per_epoch, self.pad_id = items, per_epoch, pad_id
        self.batch_size, self.seed = cfg.optim.batch_size, cfg.seed
        self._epoch, self._order = -1, [[0]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return collate(self._items(index), self.pad_id)

    def _items(self, index: int) -> list[Tokenized]:
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, batch_order(len(self.items), self.batch_size, self.seed, epoch)
        return [self.items[j] for j in self._order[i]]

    def part(self, index: int, rank: int, world: int) -> tuple[dict[str, torch.Tensor], float]:
        """Rank `rank`'s share of micro-batch `index`, collated, and its weight: its share of the loss units
        (weights sum to 1 over the ranks). A rank left without examples runs one with weight 0, so that
        every rank takes part in the gradient all-reduce."""
        items = self._items(index)
        if world == 1:
            return collate(items, self.pad_id), 1.0
        mine = shard(items, rank, world)
        if not mine:
            return collate(items[:1], self.pad_id), 0.0
        batch = collate(mine, self.pad_id)
        return batch, loss_units(batch) / max(loss_units(collate(items, self.pad_id)), 1)
