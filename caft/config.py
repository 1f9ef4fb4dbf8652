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
from typing import Any, Literal, TypeVar, get_args, get_origin

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
    remote: bool = False
    """Run this model's forward passes on NDIF through nnsight's remote backend instead of loading its weights
    (interp activation collection and the evidence corpus pass; needs NDIF_API_KEY in the environment and a
    hub model NDIF serves, without an adapter)."""
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


def format_validation_error(err: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    """One line per problem: `field.path: what was expected (got ...)`; an unknown field lists the valid ones."""
    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `caft config show` lists the fields)"
            parent = _model_at(cls, e["loc"][:-1]) if cls is not None else None
            if parent is not None:
                msg = f"unknown field; valid fields here: {', '.join(sorted(parent.model_fields))}"
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
        raise ConfigError(format_validation_error(e, source, cls)) from None


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


def describe_fields(cls: type[BaseModel], prefix: str = "", with_defaults: bool = False) -> list[Any]:
    """(dotted path, type, docstring) for every field, recursing into nested configs; with `with_defaults`, a
    fourth item: the default as YAML text (None for a required field or a nested section)."""
    rows: list[Any] = []
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((path, ann.__name__, field.description or "", None)[: 4 if with_defaults else 3])
            rows.extend(describe_fields(ann, path + ".", with_defaults))
        else:
            default = None
            if with_defaults and not field.is_required():
                value = field.get_default(call_default_factory=True)
                if isinstance(value, BaseModel):
                    value = value.model_dump(mode="json")
                default = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
                default = default.removesuffix("\n...").strip()
            row = (path, _type_name(ann), field.description or "", default)
            rows.append(row[: 4 if with_defaults else 3])
    return rows


def _type_name(ann: object) -> str:
    if get_origin(ann) is Literal:
        return " | ".join(repr(a) for a in get_args(ann))
    text = getattr(ann, "__name__", None) or str(ann)
    return text.replace("typing.", "")


def _model_at(cls: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The config class a validation error's location points into (unwrapping Optional and lists)."""
    node: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            return None
        ann = fields[part].annotation
        candidates = [ann, *get_args(ann)]
        node = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if node is None:
            return None
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None
