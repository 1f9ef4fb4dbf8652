"""One rule for stage commands' configs: a stage- or run-shaped YAML, `--set` relative or prefixed, unknown keys
named with the valid ones (reliability review: `caft evidence RUN.yaml --set corpus=X` was silently ignored)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from caft.app.commands.common import flag_overrides, load_stage_config
from caft.errors import ConfigError
from caft.interp.config import EvidenceConfig


def _write(tmp_path: Path, doc: dict[str, object]) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


RUN = {"model": {"name_or_path": "m"}, "out_dir": "runs/x", "evidence": {"top_k": 3}}


def test_run_config_with_unprefixed_and_prefixed_set(tmp_path: Path) -> None:
    path = _write(tmp_path, RUN)
    loaded = load_stage_config(path, "evidence", EvidenceConfig, ["corpus=c.jsonl", "evidence.top_k=7"])
    assert loaded.cfg.corpus == "c.jsonl" and loaded.cfg.top_k == 7
    assert loaded.run is not None and loaded.run.evidence.corpus == "c.jsonl"
    assert loaded.out_dir == Path("runs/x")
    # run-level fields are addressed by their run-level path
    loaded = load_stage_config(path, "evidence", EvidenceConfig, ["model.dtype=float32"])
    assert loaded.run is not None and loaded.run.model.dtype == "float32"


def test_run_config_without_the_section_is_still_a_run_config(tmp_path: Path) -> None:
    path = _write(tmp_path, {"model": {"name_or_path": "m"}, "name": "r", "train": {"seed": 3}})
    loaded = load_stage_config(path, "evidence", EvidenceConfig, [])
    assert loaded.run is not None and loaded.cfg == EvidenceConfig()


@pytest.mark.parametrize("shape", ["run", "stage"])
def test_unknown_set_key_names_the_valid_ones(tmp_path: Path, shape: str) -> None:
    path = _write(tmp_path, RUN if shape == "run" else {"top_k": 3})
    with pytest.raises(ConfigError, match="totally_bogus_key") as err:
        load_stage_config(path, "evidence", EvidenceConfig, ["totally_bogus_key=1"])
    assert "corpus" in str(err.value)  # the valid names are listed


def test_unknown_nested_key_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, {"top_k": 3})
    with pytest.raises(ConfigError, match=r"steering\.bogus"):
        load_stage_config(path, "evidence", EvidenceConfig, ["steering.bogus=1"])


def test_stage_config_and_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, {"top_k": 3, "out_dir": "runs/y"})
    flags = flag_overrides(
        {"corpus": "corpus", "top": "top_k", "none": "batch_size"},
        {"corpus": Path("a b.jsonl"), "top": 5, "none": None},
    )
    assert flags == ['corpus="a b.jsonl"', "top_k=5"]
    loaded = load_stage_config(path, "evidence", EvidenceConfig, ["top_k=9"], flags=flags)
    assert loaded.run is None and loaded.cfg.corpus == "a b.jsonl" and loaded.cfg.top_k == 9  # --set wins
    assert loaded.out_dir == Path("runs/y")
