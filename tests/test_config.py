from __future__ import annotations

from pathlib import Path

import pytest

from caft.app.run_config import RunConfig
from caft.config import ModelConfig, apply_overrides, describe_fields, load_config
from caft.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_load_with_overrides_parses_yaml_values(tmp_path: Path) -> None:
    p = write(tmp_path, "model:\n  name_or_path: some/model\nseed: 1\n")
    cfg = load_config(p, RunConfig, ["seed=7", "model.dtype=bfloat16", "model.chat.max_length=64"])
    assert cfg.seed == 7
    assert cfg.model.dtype == "bfloat16"
    assert cfg.model.chat.max_length == 64
    assert cfg.model.name_or_path == "some/model"


def test_error_names_file_field_path_and_expectation(tmp_path: Path) -> None:
    p = write(tmp_path, "model:\n  name_or_path: m\n  dtype: float64\n  chat:\n    max_length: -3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, RunConfig)
    msg = str(e.value)
    assert str(p) in msg
    assert "model.dtype" in msg and "'auto', 'float32', 'bfloat16' or 'float16'" in msg and "float64" in msg
    assert "model.chat.max_length" in msg and "greater than 0" in msg


def test_unknown_and_missing_fields(tmp_path: Path) -> None:
    p = write(tmp_path, "modle:\n  name_or_path: m\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, RunConfig)
    msg = str(e.value)
    assert "modle: unknown field" in msg
    assert "model: Field required" in msg


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["seed"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", RunConfig)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"), RunConfig)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), RunConfig)


def test_every_field_is_documented() -> None:
    rows = describe_fields(RunConfig)
    assert {r[0] for r in rows} >= {"model.name_or_path", "model.chat.template", "seed"}
    undocumented = [path for path, _t, doc in rows if not doc]
    assert undocumented == []
    assert ModelConfig.model_fields["dtype"].description
