"""Bad inputs: each a clear error naming the problem and the fix, and no partial file that looks complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from interp_helpers import chat_rows, make_pair, write_jsonl

from caft.config import ModelConfig
from caft.errors import DataError, ModelError, RunDirError, SiteError
from caft.interp.config import DiffConfig, EvidenceConfig, InputsConfig, SteeringConfig
from caft.interp.evidence import build_dossiers
from caft.interp.pca import run_diff
from caft.testing import save_tiny, tiny_model, tiny_tokenizer


def _assert_nothing_complete(stage: Path) -> None:
    assert not (stage / "DONE.json").exists()
    assert not (stage / "candidates.jsonl").exists()
    assert not (stage / "directions.safetensors").exists()
    assert not list(stage.glob("dossiers/*.json"))


def _cfg(data: Path, layers: list[int] | None = None) -> DiffConfig:
    return DiffConfig(inputs=InputsConfig(data=[str(data)]), n_components=2, layers=layers)


def test_different_tokenizers(tmp_path: Path) -> None:
    base, _ = make_pair(tmp_path)
    other = tmp_path / "other"
    save_tiny(other, "llama", seed=1)
    tiny_tokenizer("chatml", vocab_size=350).save_pretrained(other)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    with pytest.raises(ModelError, match="tokenizers differ"):
        run_diff(_cfg(data), tmp_path / "run", model=base, finetuned=ModelConfig(name_or_path=str(other)))
    _assert_nothing_complete(tmp_path / "run" / "diff")


def test_different_d_model(tmp_path: Path) -> None:
    base, _ = make_pair(tmp_path)
    wide = save_tiny(tmp_path / "wide", "llama", seed=1, hidden=48)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    with pytest.raises(ModelError, match=r"d_model=32.*d_model=48"):
        run_diff(_cfg(data), tmp_path / "run", model=base, finetuned=ModelConfig(name_or_path=str(wide)))
    _assert_nothing_complete(tmp_path / "run" / "diff")


def test_layer_out_of_range(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    with pytest.raises(SiteError, match=r"out of range.*valid layers are 0..2"):
        run_diff(_cfg(data, layers=[7]), tmp_path / "run", model=base, finetuned=ft)
    _assert_nothing_complete(tmp_path / "run" / "diff")


def test_nan_activations(tmp_path: Path) -> None:
    base, _ = make_pair(tmp_path)
    model = tiny_model("llama", seed=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tiny_tokenizer("chatml").save_pretrained(tmp_path / "nan")
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    with pytest.raises(ModelError, match="NaN/inf activations at layer 1"):
        run_diff(
            _cfg(data),
            tmp_path / "run",
            model=base,
            finetuned=ModelConfig(name_or_path=str(tmp_path / "nan")),
        )
    _assert_nothing_complete(tmp_path / "run" / "diff")


def test_empty_inputs_and_empty_corpus(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl has nothing to analyse \(the file has no rows\)"):
        run_diff(_cfg(empty), tmp_path / "run", model=base, finetuned=ft)
    _assert_nothing_complete(tmp_path / "run" / "diff")

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(6))
    run_diff(_cfg(data, layers=[1]), tmp_path / "run2", model=base, finetuned=ft)
    cfg = EvidenceConfig(corpus=str(empty), steering=SteeringConfig(enabled=False))
    with pytest.raises(DataError, match=r"corpus 'empty.jsonl' is empty"):
        build_dossiers(cfg, tmp_path / "run2", model=base, finetuned=ft)
    _assert_nothing_complete(tmp_path / "run2" / "evidence")


def test_malformed_rows_name_the_line(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*chat_rows(2), {"prompt": "no messages here"}])
    with pytest.raises(DataError, match=r"bad.jsonl:3: expected a chat row"):
        run_diff(_cfg(bad), tmp_path / "run", model=base, finetuned=ft)
    nobody = write_jsonl(tmp_path / "nobody.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="no assistant turn"):
        run_diff(_cfg(nobody), tmp_path / "run", model=base, finetuned=ft)


def test_encoder_rejects_chat_rows(tmp_path: Path, minilm_dir: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(2))
    enc = ModelConfig(name_or_path=str(minilm_dir), kind="encoder", device="cpu")
    with pytest.raises(DataError, match="encoder reads plain text rows"):
        run_diff(_cfg(data), tmp_path / "run", model=enc, finetuned=enc)


def test_changed_settings_on_a_partial_stage(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(6))
    stage = tmp_path / "run" / "diff"
    stage.mkdir(parents=True)
    (stage / "state.json").write_text(json.dumps({"layers": [0], "n_batches": 1, "batches_done": 1}))
    (stage / "state.safetensors").write_bytes(b"")
    with pytest.raises(RunDirError, match="delete the diff folder"):
        run_diff(_cfg(data, layers=[1]), tmp_path / "run", model=base, finetuned=ft)


def test_candidates_from_another_model(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(6))
    run_diff(_cfg(data, layers=[1]), tmp_path / "run", model=base, finetuned=ft)
    wide = save_tiny(tmp_path / "wide", "llama", seed=1, hidden=48)
    cfg = EvidenceConfig(steering=SteeringConfig(enabled=False))
    with pytest.raises(DataError, match="d_model is 48"):
        build_dossiers(cfg, tmp_path / "run", model=ModelConfig(name_or_path=str(wide)))
    _assert_nothing_complete(tmp_path / "run" / "evidence")
