"""Configs: small pydantic models per stage, composed into one run config, loaded from YAML.

Every field carries a docstring (kept by `use_attribute_docstrings`, shown by `caft config show`).
Validators only validate. Secrets never live in a config: API keys come from the environment.

Loading: `load_config(path, RunConfig, overrides=["train.optim.lr=1e-5"])` (RunConfig, the composition of
every stage's section, is in `caft.app.run_config`). A validation error names the file,
the dotted field path, what was expected and what was given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from caft.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


class CaftConfig(BaseModel):
    """Base of every caft config: unknown keys are errors, field docstrings are kept."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, protected_namespaces=()
    )


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
ModelKind = Literal["causal_lm", "encoder", "sequence_classification"]


class ChatConfig(CaftConfig):
    """How conversations become tokens."""

    template: Literal["model", "chatml", "plain"] = "model"
    """`model`: the tokenizer's own chat template (an error if it has none); `chatml` or `plain`: a built-in
    fallback format that you choose explicitly for tokenizers without a template."""
    max_length: int = Field(default=2048, gt=0)
    """Maximum tokens per example."""


class ModelConfig(CaftConfig):
    """A model to load: a hub id or a local path, optionally with a peft adapter on top."""

    name_or_path: str
    """Hub id (e.g. `Qwen/Qwen2.5-0.5B-Instruct`) or a local directory. With HF_HUB_OFFLINE=1 only local
    paths and already-cached ids load."""
    kind: ModelKind = "causal_lm"
    """`causal_lm` for decoders, `encoder` for BERT-style models, `sequence_classification` for an encoder with
    a classification head."""
    adapter: str | None = None
    """Path or id of a peft adapter to put on top of the model."""
    dtype: Dtype = "auto"
    """Weights dtype; `auto` takes bfloat16 on a GPU that supports it, float32 on CPU."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`, ..."""
    trust_remote_code: bool = False
    """Allow custom model code from the hub (off by default)."""
    revision: str | None = None
    """A hub revision (branch, tag or commit) to pin."""
    chat: ChatConfig = Field(default_factory=ChatConfig)
    """Chat formatting."""


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: dict[str, Any] = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = {}
            node[key] = child
        elif not isinstance(child, dict):
            where = ".".join(keys[: i + 1])
            raise ConfigError(f"override {dotted!r}: {where!r} is a value ({child!r}), not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with `a.b=c` overrides applied; values are parsed as YAML (`1e-5`, `true`, `[1, 2]`)."""
    out: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form section.field=value (e.g. train.lr=1e-5)"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty field path")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key, value)
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `field.path: what was expected (got ...)`."""
    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `caft config show` lists the fields)"
        got = e.get("input")
        got_s = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        if len(got_s) > 120:
            got_s = got_s[:117] + "...)"
        lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not UTF-8 text: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections (got a {type(data).__name__})")
    return data


def validate_config(cls: type[C], data: Mapping[str, Any], source: str = "<config>") -> C:
    """Validate a mapping against a config class; a failure is a `ConfigError` naming each bad field."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: str | Path | None, cls: type[C], overrides: Sequence[str] = ()) -> C:
    """Load `cls` from a YAML file (or from nothing but overrides when `path` is None) plus `a.b=c` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    source = str(path) if path is not None else "<overrides>"
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return validate_config(cls, data, source)


def config_to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML (what `caft config validate` prints and run manifests store)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_fields(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted path, type, docstring) for every field, recursing into nested configs."""
    rows: list[tuple[str, str, str]] = []
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((path, ann.__name__, field.description or ""))
            rows.extend(describe_fields(ann, path + "."))
        else:
            rows.append((path, _type_name(ann), field.description or ""))
    return rows


def _type_name(ann: object) -> str:
    text = getattr(ann, "__name__", None) or str(ann)
    return text.replace("typing.", "")
