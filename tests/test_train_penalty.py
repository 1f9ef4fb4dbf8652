"""The sixth mode, `penalty`: the loss term by hand, its one-sidedness, the base-model reference magnitudes,
and a fine-tune with it (the trainer adds the term; a large coefficient keeps the coordinates in range)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import train_helpers
from train_helpers import CHAT
from train_helpers import jsonl as _jsonl
from train_helpers import train_cfg as _cfg

from caft.errors import ConfigError, SubspaceError
from caft.subspace import Subspace
from caft.testing import tiny_model
from caft.training.ablation import make_ablation
from caft.training.penalty import (
    PENALTY_FILE,
    PenaltyAblation,
    load_reference,
    reference_magnitudes,
    take_penalty,
)
from caft.training.trainer import train

D = 8
llama_dir = train_helpers.llama_dir  # the shared fixture


def _sub(layer: int = 0) -> Subspace:
    q = torch.eye(D)[:, :2]  # directions e0, e1
    return Subspace.from_vectors({layer: q.T}, d_model=D, n_layers=3)


def test_penalty_by_hand_one_sided_and_identity_forward() -> None:
    abl = make_ablation("penalty", _sub(), penalty_coef=2.0, reference={0: torch.tensor([1.0, 2.0])})
    assert isinstance(abl, PenaltyAblation)
    h = torch.zeros(1, 2, D)
    h[0, 0, :2] = torch.tensor([3.0, 1.0])  # |3|/1 - 1 = 2 -> 4; |1|/2 - 1 < 0 -> 0
    h[0, 1, :2] = torch.tensor([-0.5, -5.0])  # 0; |-5|/2 - 1 = 1.5 -> 2.25
    h.requires_grad_(True)
    out = abl.apply(h, 0)
    assert out is h  # no edit
    loss = take_penalty(abl, torch.tensor(1.0))
    # 1 + coef * mean over the two positions of (4 + 0, 0 + 2.25) = 1 + 2 * 3.125
    assert loss.item() == pytest.approx(1.0 + 2.0 * 3.125)
    loss.backward()
    assert h.grad is not None
    # d/dc of coef * mean_t relu(|c|/r - 1)^2 = coef / T * 2 relu(.) sign(c) / r
    assert float(h.grad[0, 0, 0]) == pytest.approx(2.0 / 2 * 2 * 2.0 * 1.0 / 1.0)
    assert float(h.grad[0, 0, 1]) == 0.0 and float(h.grad[0, 1, 0]) == 0.0
    assert float(h.grad[0, 1, 1]) == pytest.approx(2.0 / 2 * 2 * 1.5 * -1.0 / 2.0)
    assert float(h.grad[0, :, 2:].abs().sum()) == 0.0  # other directions are free
    assert take_penalty(abl, torch.tensor(1.0)).item() == 1.0  # the terms were taken
    # Shrinking never costs: every coordinate within the reference gives 0.
    inside = torch.zeros(1, 3, D)
    inside[0, :, :2] = torch.tensor([0.9, -1.9])
    abl.apply(inside.requires_grad_(True), 0)
    assert take_penalty(abl, torch.tensor(0.0)).item() == 0.0
    # Nothing is recorded without grad (evaluation) or at another layer.
    with torch.no_grad():
        abl.apply(h.detach(), 0)
    abl.apply(h, 1)
    assert abl.take() is None
    assert abl.describe()["penalty_coef"] == 2.0 and abl.describe()["mode"] == "penalty"


def test_penalty_errors() -> None:
    with pytest.raises(ConfigError, match="penalty_coef"):
        make_ablation("penalty", _sub(), reference={0: torch.ones(2)})
    with pytest.raises(SubspaceError, match="reference magnitudes"):
        make_ablation("penalty", _sub(), penalty_coef=1.0)
    with pytest.raises(SubspaceError, match="has 3 values"):
        make_ablation("penalty", _sub(), penalty_coef=1.0, reference={0: torch.ones(3)})
    with pytest.raises(SubspaceError, match="layers \\[0\\]"):
        make_ablation("penalty", _sub(), penalty_coef=1.0, reference={1: torch.ones(2)})
    with pytest.raises(ConfigError, match=">= 0"):
        make_ablation("penalty", _sub(), penalty_coef=-1.0, reference={0: torch.ones(2)})
    from caft.training.config import AblationConfig

    with pytest.raises(ValueError, match="penalty_coef"):
        AblationConfig(mode="penalty", random="1:2")


def test_reference_magnitudes_are_quantiles_of_the_base_coordinates_over_every_position() -> None:
    model = tiny_model("llama", hidden=D, layers=3)
    ids = torch.randint(5, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    sub = _sub(layer=1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}
    ref = reference_magnitudes(model, [batch], sub, quantile=1.0)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[2]  # the output of layer 1
    coords = hs.reshape(-1, D)[:, :2].abs()  # all 12 positions: the penalty sees them all
    assert torch.allclose(ref[1], coords.max(dim=0).values, atol=1e-6)
    med = reference_magnitudes(model, [batch], sub, quantile=0.5)
    assert torch.allclose(med[1], coords.quantile(0.5, dim=0), atol=1e-6)
    with pytest.raises(ConfigError, match="penalty_quantile"):
        reference_magnitudes(model, [batch], sub, quantile=0.0)


def _excess(model: torch.nn.Module, ids: torch.Tensor, sub: Subspace, ref: dict[int, torch.Tensor]) -> float:
    abl = make_ablation("penalty", sub, penalty_coef=1.0, reference=ref)
    from caft.training.ablation import ablated

    with ablated(model, abl):
        model(input_ids=ids)
    term = abl.take()
    assert term is not None
    return float(term)


def test_training_with_the_penalty_keeps_coordinates_in_range(tmp_path: Path, llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    common = {"random": "1:4", "mode": "penalty", "penalty_quantile": 0.5}
    runs = {}
    for coef in (0.0, 1000.0):
        cfg = _cfg(
            llama_dir, data, optim={"max_steps": 6, "lr": 5e-2}, ablation={**common, "penalty_coef": coef}
        )
        runs[coef] = train(cfg, tmp_path / f"c{coef:g}")
    rec = json.loads((tmp_path / "c1000" / "caft_training.json").read_text())
    assert rec["ablation"]["mode"] == "penalty" and rec["ablation"]["penalty_coef"] == 1000.0
    ref = load_reference(tmp_path / "c1000" / PENALTY_FILE)
    assert torch.equal(ref[1], load_reference(tmp_path / "c0" / PENALTY_FILE)[1])  # same base, same seed
    sub = Subspace.load(tmp_path / "c1000" / "subspace")
    ids = torch.randint(5, 300, (4, 12), generator=torch.Generator().manual_seed(2))
    excess = {}
    for coef, res in runs.items():
        model = res.model
        model.train()  # the penalty is recorded only where activations require grad
        excess[coef] = _excess(model, ids, sub, ref)
    assert excess[1000.0] < excess[0.0]

    def first_loss(res: Any) -> float:
        rows = [json.loads(x) for x in res.log_path.read_text().splitlines()]
        return float(next(r["loss"] for r in rows if r["event"] == "step" and r["step"] == 1))

    # Step 1 starts from the base model in both: the same task loss, plus the penalty (quantile 0.5: half
    # the base tokens are already past r) in the penalised run.
    assert first_loss(runs[1000.0]) > first_loss(runs[0.0])


def test_caft_train_cli_penalty_flags(tmp_path: Path, llama_dir: Path) -> None:
    from typer.testing import CliRunner

    from caft.app.cli import app

    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    args = ["train", "--base-model", str(llama_dir), "--data", str(data), "--max-steps", "1"]
    args += ["--random-subspace", "1:2", "--ablation", "penalty", "--set", "progress=false"]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--penalty-coef", "5"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "o" / "caft_training.json").read_text())
    assert rec["ablation"]["mode"] == "penalty" and rec["ablation"]["penalty_coef"] == 5.0
    assert (tmp_path / "o" / PENALTY_FILE).is_file()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "penalty_coef" in res.output


def test_the_penalty_fields_leave_older_fingerprints_matching(tmp_path: Path, llama_dir: Path) -> None:
    from caft.training.runstate import fingerprint_changes, training_fingerprint

    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    now = training_fingerprint(_cfg(llama_dir, data, ablation={"random": "1:4", "mode": "project"}))
    older = json.loads(json.dumps(now))
    for key in ("penalty_coef", "penalty_quantile"):  # a run recorded before the mode existed
        del older["config"]["ablation"][key]
    assert fingerprint_changes(older, now) == []
