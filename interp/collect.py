"""Activation differences: the base and the fine-tuned model on the SAME token batches.

    source = ActivationSource.load(base_cfg, ft_cfg)
    examples = prepare_inputs(inputs_cfg, source, stage_dir)
    for db in collect_diffs(source, make_batches(examples, 8, source.pad_id), layers=[4, 8]):
        db.diffs[8]                                       # (N, d) ft - base on the selected tokens

Also the resume points of the passes built on it (`save_state` / `load_state`). The inputs live in
`caft.interp.inputs`, the model pair in `caft.interp.source`, sampled answers in `caft.interp.answers`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caft.interp.inputs import TokenBatch
from caft.interp.source import ActivationSource
from caft.rundir import atomic_write_bytes

__all__ = ["DiffBatch", "PassState", "collect_diffs", "load_state", "save_state"]

log = logging.getLogger(__name__)


@dataclass
class DiffBatch:
    """Selected tokens of one batch: ft - base residuals per layer, plus where each token sits."""

    batch: TokenBatch
    diffs: dict[int, torch.Tensor]  # layer -> (N, d) float32
    base: dict[int, torch.Tensor]  # layer -> (N, d) float32
    rows: torch.Tensor  # (N,) batch row of each selected token
    cols: torch.Tensor  # (N,) position of each selected token

    @property
    def n_tokens(self) -> int:
        return int(self.rows.numel())


def collect_diffs(
    source: ActivationSource, batches: Iterable[TokenBatch], layers: Sequence[int]
) -> Iterator[DiffBatch]:
    """For each batch: run the base and the fine-tuned model on the same tokens and yield the differences
    of the residual outputs at `layers` on the selected tokens."""
    layers = source.sites.check_layers(list(layers))
    for batch in batches:
        if batch.n_selected == 0:
            continue
        base = source.hidden("base", batch, layers)
        ft = source.hidden("ft", batch, layers)
        sel = batch.select.to(source.device)
        rows, cols = sel.nonzero(as_tuple=True)
        diffs: dict[int, torch.Tensor] = {}
        base_sel: dict[int, torch.Tensor] = {}
        for layer in layers:
            b = base[layer][sel].float()  # (N, d)
            diffs[layer] = ft[layer][sel].float() - b
            base_sel[layer] = b
        yield DiffBatch(batch, diffs, base_sel, rows, cols)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """A pass's running state (tensors, numbers, lists) written atomically: the resume point."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


class PassState:
    """The resume point of one pass over batches: `key` names its inputs (layers, candidates, batch count),
    so a state saved for other inputs is ignored. Without a path nothing is read or written."""

    def __init__(self, path: Path | None, key: dict[str, Any], name: str) -> None:
        self.path, self.key, self.name = path, key, name

    def resume(self) -> dict[str, Any] | None:
        """The saved state, if one was saved for the same inputs."""
        saved = load_state(self.path) if self.path is not None else None
        if saved is not None and saved.get("key") != self.key:
            log.info("%s state in %s was made for other inputs; starting over", self.name, self.path)
            return None
        return saved

    def save(self, **state: Any) -> None:
        if self.path is not None:
            save_state(self.path, {"key": self.key, **state})
