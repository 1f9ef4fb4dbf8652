"""A finished training run is reused only when it is the run this call asks for (same fingerprint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import train_helpers
from train_helpers import CHAT
from train_helpers import jsonl as _jsonl
from train_helpers import train_cfg as _cfg

from caft.errors import RunDirError
from caft.training.ablation import random_subspace
from caft.training.runstate import (
    RECORD_FILE,
    fingerprint_changes,
    recorded_fingerprint,
    training_fingerprint,
)
from caft.training.trainer import train

llama_dir = train_helpers.llama_dir  # the shared fixture


def test_finished_run_is_reused_only_with_the_same_fingerprint(tmp_path: Path, llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    cfg = _cfg(llama_dir, data, optim={"max_steps": 1})
    sub = random_subspace("1:2", 32, seed=0, n_layers=3)
    out = tmp_path / "o"
    first = train(cfg, out, subspace=sub)

    fp = training_fingerprint(cfg, subspace=sub)
    assert recorded_fingerprint(out) == fp
    assert fingerprint_changes(recorded_fingerprint(out), fp) == []
    assert fp["subspace_digest"] == sub.digest() and fp["ablation_mode"] == "project"

    # same inputs: nothing is retrained, the recorded metrics come back
    again = train(cfg, out, subspace=sub, resume=True)
    assert again.model is None and again.metrics == first.metrics
    # settings that do not change the numbers, and a moved data file with the same bytes, are the same run
    moved = shutil.copy(data, tmp_path / "moved.jsonl")
    same = _cfg(llama_dir, Path(moved), optim={"max_steps": 1}, log_every=5)
    assert train(same, out, subspace=sub, resume=True).model is None

    other_sub = random_subspace("1:2", 32, seed=1, n_layers=3)
    with pytest.raises(RunDirError, match=r"different inputs \(changed: subspace_digest\).*Delete"):
        train(cfg, out, subspace=other_sub, resume=True)
    with pytest.raises(RunDirError, match=r"changed: .*ablation_mode.*subspace_digest"):
        train(cfg, out, resume=True)  # no subspace: plain fine-tuning is another run
    with pytest.raises(RunDirError, match=r"changed: config\.optim\.lr"):
        train(_cfg(llama_dir, data, optim={"max_steps": 1, "lr": 5e-3}), out, subspace=sub, resume=True)
    with pytest.raises(RunDirError, match=r"changed: ablation_mode, config\.ablation\.mode"):
        train(_cfg(llama_dir, data, optim={"max_steps": 1}, ablation={"mode": "gradient"}), out, subspace=sub,
              resume=True)  # fmt: skip
    _jsonl(data, CHAT[:10])
    with pytest.raises(RunDirError, match=r"changed: data\.train"):
        train(cfg, out, subspace=sub, resume=True)
    # the comparison needs no training: the pipeline can ask before it decides to clear the folder
    assert fingerprint_changes(recorded_fingerprint(out), training_fingerprint(cfg, subspace=sub)) == [
        "data.train"
    ]
    # without --resume a finished run is never touched
    with pytest.raises(RunDirError, match="already holds a finished training run"):
        train(cfg, out, subspace=sub)


def test_a_record_without_fingerprint_is_not_taken_as_done(tmp_path: Path, llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", CHAT)
    cfg = _cfg(llama_dir, data, optim={"max_steps": 1})
    out = tmp_path / "o"
    train(cfg, out)
    rec = json.loads((out / RECORD_FILE).read_text())
    del rec["fingerprint"]
    (out / RECORD_FILE).write_text(json.dumps(rec))
    assert recorded_fingerprint(out) is None
    with pytest.raises(RunDirError, match="no fingerprint was recorded"):
        train(cfg, out, resume=True)
    assert recorded_fingerprint(tmp_path / "nothing") is None
