"""The subspace artifact: the directions to ablate, per layer, with provenance for every column.

On disk (a directory)::

    subspace.safetensors   one float32 tensor per layer, key "layer.<L>", shape [d_model, k], orthonormal columns
    subspace.json          {"format": "caft.subspace/1", "model": ..., "d_model": ..., "n_layers": ...,
                            "layers": {"<L>": [{"candidate": ..., "label": ..., "verdict": ...}, ...]}}

Loading checks shapes against the model, finiteness and orthonormality, and says exactly what is wrong.
An empty subspace (no columns at all) is valid: it is what a triage that selects nothing produces.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.errors import SubspaceError
from caft.rundir import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT = "caft.subspace/1"
TENSORS_FILE = "subspace.safetensors"
META_FILE = "subspace.json"
ORTHO_TOL = 1e-4


@dataclass
class Column:
    """Where one column of the subspace came from."""

    candidate: str | None = None
    label: str | None = None
    verdict: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"candidate": self.candidate, "label": self.label, "verdict": self.verdict}
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Column:
        return cls(d.get("candidate"), d.get("label"), d.get("verdict"), dict(d.get("extra") or {}))


@dataclass
class Subspace:
    """Per-layer orthonormal bases Q_L ([d_model, k_L]) plus per-column provenance."""

    d_model: int
    bases: dict[int, torch.Tensor] = field(default_factory=dict)
    columns: dict[int, list[Column]] = field(default_factory=dict)
    model: str | None = None
    n_layers: int | None = None

    @property
    def layers(self) -> list[int]:
        return sorted(layer for layer, q in self.bases.items() if q.shape[1] > 0)

    @property
    def total_dims(self) -> int:
        return sum(int(q.shape[1]) for q in self.bases.values())

    @property
    def is_empty(self) -> bool:
        return self.total_dims == 0

    def basis(self, layer: int) -> torch.Tensor:
        return self.bases[layer]

    def digest(self) -> str:
        """sha256 over layers, shapes and float32 bytes: identifies the subspace in training records."""
        import torch

        h = hashlib.sha256()
        for layer in sorted(self.bases):
            q = self.bases[layer].detach().to("cpu", torch.float32).contiguous()
            h.update(f"{layer}:{tuple(q.shape)};".encode())
            h.update(q.numpy().tobytes())
        return h.hexdigest()

    # ---- validation -------------------------------------------------------------------------------------
    def validate(
        self, d_model: int | None = None, n_layers: int | None = None, tol: float = ORTHO_TOL
    ) -> None:
        import torch

        want_d = d_model if d_model is not None else self.d_model
        if d_model is not None and self.d_model != d_model:
            raise SubspaceError(
                f"subspace has d_model={self.d_model} but the model's hidden size is {d_model}"
            )
        for layer, q in sorted(self.bases.items()):
            if n_layers is not None and not 0 <= layer < n_layers:
                raise SubspaceError(
                    f"subspace names layer {layer}, but the model has {n_layers} layers (0..{n_layers - 1})"
                )
            if q.ndim != 2 or q.shape[0] != want_d:
                raise SubspaceError(
                    f"layer {layer}: basis has shape {tuple(q.shape)}, expected [{want_d}, k]"
                )
            if not torch.isfinite(q).all():
                raise SubspaceError(f"layer {layer}: basis holds NaN or inf values")
            k = q.shape[1]
            if k > want_d:
                raise SubspaceError(f"layer {layer}: {k} columns exceed d_model={want_d}")
            if k:
                gram = q.double().T @ q.double()
                err = (gram - torch.eye(k, dtype=torch.float64)).abs().max().item()
                if err > tol:
                    raise SubspaceError(
                        f"layer {layer}: columns are not orthonormal (max |Q^T Q - I| = {err:.2e} > {tol:.0e}); "
                        "build it with caft.subspace.orthonormalize or Subspace.from_vectors"
                    )
            cols = self.columns.get(layer, [])
            if len(cols) not in (0, k):
                raise SubspaceError(f"layer {layer}: {k} columns but {len(cols)} provenance records")

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_vectors(
        cls,
        vectors: dict[int, torch.Tensor],
        d_model: int,
        provenance: dict[int, list[Column]] | None = None,
        model: str | None = None,
        n_layers: int | None = None,
        tol: float = 1e-6,
    ) -> Subspace:
        """Orthonormalize each layer's vectors ([n, d_model], one direction per row); near-dependent vectors are
        dropped with a warning, and so is their provenance record."""
        bases: dict[int, torch.Tensor] = {}
        columns: dict[int, list[Column]] = {}
        for layer, vecs in vectors.items():
            q, kept = orthonormalize(vecs, tol=tol)
            if q.shape[0] != d_model:
                raise SubspaceError(f"layer {layer}: vectors have dimension {q.shape[0]}, expected {d_model}")
            bases[layer] = q
            prov = (provenance or {}).get(layer)
            columns[layer] = [prov[i] for i in kept] if prov else [Column() for _ in kept]
        sub = cls(d_model=d_model, bases=bases, columns=columns, model=model, n_layers=n_layers)
        sub.validate()
        return sub

    # ---- disk -------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        import torch
        from safetensors.torch import save

        self.validate()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"layer.{layer}": q.detach().to("cpu", torch.float32).contiguous()
            for layer, q in sorted(self.bases.items())
        }
        meta = {
            "format": FORMAT,
            "model": self.model,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "total_dims": self.total_dims,
            "digest": self.digest(),
            "layers": {
                str(layer): [c.to_json() for c in self.columns.get(layer, [])] for layer in sorted(self.bases)
            },
        }
        atomic_write_bytes(d / TENSORS_FILE, save(tensors))
        atomic_write_json(d / META_FILE, meta)
        return d

    @classmethod
    def load(
        cls,
        directory: str | Path,
        d_model: int | None = None,
        n_layers: int | None = None,
        tol: float = ORTHO_TOL,
    ) -> Subspace:
        """Load and validate; `d_model`/`n_layers` (from the model's sites) are checked when given."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        if d.is_file() and d.name in (TENSORS_FILE, META_FILE):
            d = d.parent
        tpath, mpath = d / TENSORS_FILE, d / META_FILE
        for p in (tpath, mpath):
            if not p.is_file():
                raise SubspaceError(
                    f"{p} is missing: a subspace directory holds {TENSORS_FILE} and {META_FILE}"
                )
        try:
            meta = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SubspaceError(f"{mpath} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SubspaceError(
                f"{mpath}: expected format {FORMAT!r}, got {meta.get('format') if isinstance(meta, dict) else meta!r}"
            )
        try:
            raw = load_file(str(tpath))
        except (SafetensorError, OSError) as e:
            raise SubspaceError(f"{tpath} cannot be read as safetensors: {e}") from None
        bases: dict[int, torch.Tensor] = {}
        for key, q in raw.items():
            if not key.startswith("layer.") or not key[6:].lstrip("-").isdigit():
                raise SubspaceError(f"{tpath}: unexpected tensor name {key!r} (expected layer.<L>)")
            bases[int(key[6:])] = q
        layers_meta = meta.get("layers") or {}
        if sorted(int(k) for k in layers_meta) != sorted(bases):
            raise SubspaceError(
                f"{mpath} lists layers {sorted(int(k) for k in layers_meta)} but {tpath} holds {sorted(bases)}"
            )
        columns = {int(k): [Column.from_json(c) for c in v] for k, v in layers_meta.items()}
        sub = cls(
            d_model=int(meta["d_model"]),
            bases=bases,
            columns=columns,
            model=meta.get("model"),
            n_layers=meta.get("n_layers"),
        )
        sub.validate(d_model=d_model, n_layers=n_layers, tol=tol)
        return sub


def orthonormalize(vectors: torch.Tensor, tol: float = 1e-6) -> tuple[torch.Tensor, list[int]]:
    """Orthonormal basis ([d, k]) of the rows of `vectors` ([n, d]) by modified Gram-Schmidt in float64.

    A vector whose residual after removing the earlier ones is below `tol` times its norm is dropped (with a
    warning). Returns the basis and the indices of the rows that were kept, in order.
    """
    import torch

    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2:
        raise SubspaceError(f"expected vectors of shape [n, d], got {tuple(vectors.shape)}")
    if not torch.isfinite(vectors).all():
        raise SubspaceError("vectors hold NaN or inf values")
    v = vectors.detach().to("cpu", torch.float64)
    d = v.shape[1]
    basis: list[torch.Tensor] = []
    kept: list[int] = []
    for i in range(v.shape[0]):
        x = v[i].clone()
        norm0 = x.norm()
        if norm0 == 0:
            log.warning("dropping vector %d: it is zero", i)
            continue
        for _ in range(2):  # re-orthogonalize once for numerical stability
            for b in basis:
                x -= (x @ b) * b
        if x.norm() <= tol * norm0:
            log.warning("dropping vector %d: it lies in the span of the earlier vectors", i)
            continue
        basis.append(x / x.norm())
        kept.append(i)
    q = torch.stack(basis, dim=1) if basis else torch.zeros(d, 0, dtype=torch.float64)
    return q.to(torch.float32), kept
