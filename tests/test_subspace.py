from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from caft.errors import SubspaceError
from caft.subspace import Column, Subspace, orthonormalize


def make(d: int = 16) -> Subspace:
    return Subspace.from_vectors(
        {1: torch.randn(3, d), 4: torch.randn(2, d)},
        d_model=d,
        provenance={
            1: [Column(f"pc:L1:{i}", f"label {i}", f"v{i}") for i in range(3)],
            4: [Column("x"), Column("y")],
        },
        model="tiny",
        n_layers=6,
    )


def test_round_trip(tmp_path: Path) -> None:
    sub = make()
    sub.save(tmp_path / "s")
    back = Subspace.load(tmp_path / "s", d_model=16, n_layers=6)
    assert back.layers == [1, 4] and back.total_dims == 5 and back.model == "tiny"
    assert torch.equal(back.basis(1), sub.basis(1))
    assert back.columns[1][2].candidate == "pc:L1:2" and back.columns[1][2].label == "label 2"
    assert back.digest() == sub.digest()
    meta = json.loads((tmp_path / "s" / "subspace.json").read_text())
    assert meta["digest"] == sub.digest() and meta["total_dims"] == 5
    q = back.basis(1)
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)


def test_orthonormalize_drops_dependent_vectors(caplog: pytest.LogCaptureFixture) -> None:
    a, b = torch.randn(8), torch.randn(8)
    with caplog.at_level(logging.WARNING):
        q, kept = orthonormalize(torch.stack([a, b, 2 * a - b, torch.zeros(8)]))
    assert kept == [0, 1] and q.shape == (8, 2)
    assert "span of the earlier vectors" in caplog.text and "zero" in caplog.text
    sub = Subspace.from_vectors(
        {0: torch.stack([a, 3 * a])}, 8, provenance={0: [Column("first"), Column("dup")]}
    )
    assert [c.candidate for c in sub.columns[0]] == ["first"]


def test_empty_subspace_is_valid(tmp_path: Path) -> None:
    sub = Subspace(d_model=8)
    assert sub.is_empty
    sub.save(tmp_path / "e")
    assert Subspace.load(tmp_path / "e", d_model=8).is_empty


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"d_model": 32}, "d_model=16 but the model's hidden size is 32"),
        ({"n_layers": 3}, "names layer 4, but the model has 3 layers"),
    ],
)
def test_mismatch_with_model(tmp_path: Path, kwargs: dict[str, int], problem: str) -> None:
    make().save(tmp_path / "s")
    with pytest.raises(SubspaceError, match=problem):
        Subspace.load(tmp_path / "s", **kwargs)


def corrupt(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    d = tmp_path / "bad"
    make().save(d)
    save_file(tensors, str(d / "subspace.safetensors"))
    return d


def test_validation_errors(tmp_path: Path) -> None:
    q = torch.linalg.qr(torch.randn(16, 3))[0].contiguous()
    good4 = torch.linalg.qr(torch.randn(16, 2))[0].contiguous()
    nan = q.clone()
    nan[0, 0] = float("nan")
    cases = [
        ({"layer.1": nan, "layer.4": good4}, "NaN or inf"),
        ({"layer.1": q * 2, "layer.4": good4}, "not orthonormal"),
        ({"layer.1": torch.randn(15, 3), "layer.4": good4}, r"shape \(15, 3\), expected \[16, k\]"),
        ({"layer.1": q}, r"lists layers \[1, 4\] but .* holds \[1\]"),
        ({"layer.1": q, "layer.4": good4, "weird": q.clone()}, "unexpected tensor name 'weird'"),
        ({"layer.1": q[:, :2].contiguous(), "layer.4": good4}, "2 columns but 3 provenance records"),
    ]
    for tensors, problem in cases:
        with pytest.raises(SubspaceError, match=problem):
            Subspace.load(corrupt(tmp_path, tensors))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SubspaceError, match="missing"):
        Subspace.load(tmp_path)
    d = tmp_path / "s"
    make().save(d)
    (d / "subspace.json").write_text("{nope")
    with pytest.raises(SubspaceError, match="not valid JSON"):
        Subspace.load(d)
    (d / "subspace.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SubspaceError, match="expected format"):
        Subspace.load(d)
    with pytest.raises(SubspaceError, match="NaN or inf"):
        orthonormalize(torch.tensor([[float("inf"), 0.0]]))
