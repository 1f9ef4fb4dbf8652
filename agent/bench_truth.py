"""Ground truth of the judge benchmark (`caft.agent.bench`): labelled rows of a spurious-format dataset
folder, balanced so that label and cue vary independently, and per direction the correlation of its
mean-pooled projection with each.

Read only after the judge has finished; nothing here reaches the judge.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.config import ModelConfig
from caft.errors import DataError
from caft.rundir import atomic_write_text, iter_jsonl

if TYPE_CHECKING:
    import torch


def labelled_rows(data: Path) -> list[dict[str, Any]]:
    """The val and OOD rows of a spurious-format dataset folder (each with `text`, `label`, `cue`)."""
    meta_path = data / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"{data}: no meta.json; expected a dataset folder in the spurious format (docs/demo.md)"
        )
    files = json.loads(meta_path.read_text(encoding="utf-8")).get("files", {})
    rows: list[dict[str, Any]] = []
    for split in ("val", "ood"):
        path = data / files.get(split, f"{split}.jsonl")
        if not path.is_file():
            raise DataError(f"{data}: no {path.name} (the {split} split)")
        for i, r in enumerate(iter_jsonl(path)):
            if not isinstance(r, dict) or not {"text", "label", "cue"} <= set(r):
                raise DataError(f"{path}:{i + 1}: expected a row with text, label and cue")
            rows.append({"text": str(r["text"]), "label": int(r["label"]), "cue": int(r["cue"])})
    return rows


def balanced(rows: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The same number of rows in every (label, cue) cell: label and cue independent."""
    cells: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["label"], r["cue"])].append(r)
    labels, cues = {k[0] for k in cells}, {k[1] for k in cells}
    if len(labels) < 2 or len(cues) < 2 or len(cells) < len(labels) * len(cues):
        raise DataError(
            f"the val + ood rows fill only the (label, cue) cells {sorted(cells)}: every combination is "
            "needed for a corpus where the two vary independently"
        )
    n = min(len(v) for v in cells.values())
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for k in sorted(cells):
        out += rng.sample(cells[k], n)
    return out


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else 0.0


def correlations(
    model: ModelConfig,
    rows: Sequence[dict[str, Any]],
    directions: dict[str, torch.Tensor],
    layers: dict[str, int],
    out: Path,
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """Direction id -> {r_cue, r_intended}: Pearson r of the mean-pooled projection with cue and label."""
    import torch

    from caft.interp.inputs import make_batches, read_examples
    from caft.interp.source import ActivationSource

    path = out / "truth_rows.jsonl"
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    source = ActivationSource.load(model)
    examples = read_examples(
        path, source.tokenizer, prefix="truth", causal=source.is_causal_lm, tokens="all", max_length=256
    )
    by_layer: dict[int, list[str]] = defaultdict(list)
    for cid, layer in layers.items():
        by_layer[layer].append(cid)
    mats = {
        L: torch.stack([directions[c].float() / directions[c].float().norm() for c in ids], dim=1)
        for L, ids in by_layer.items()
    }  # (d, C) per layer
    proj: dict[str, list[float]] = {c: [0.0] * len(rows) for c in layers}
    with torch.no_grad():
        for batch in make_batches(examples, batch_size, source.pad_id):
            hidden = source.hidden("base", batch, sorted(mats))
            m = batch.select.float().unsqueeze(-1)  # (B, T, 1)
            rows_idx = [int(d.rsplit(":", 1)[1]) for d in batch.docs]
            for L, mat in mats.items():
                pooled = (hidden[L].float().cpu() * m).sum(1) / m.sum(1).clamp_min(1)  # (B, d)
                p = pooled @ mat  # (B, C)
                for col, cid in enumerate(by_layer[L]):
                    for r, ri in enumerate(rows_idx):
                        proj[cid][ri] = float(p[r, col])
    cue = [float(r["cue"]) for r in rows]
    label = [float(r["label"]) for r in rows]
    return {
        c: {"r_cue": round(_pearson(v, cue), 4), "r_intended": round(_pearson(v, label), 4)}
        for c, v in proj.items()
    }
