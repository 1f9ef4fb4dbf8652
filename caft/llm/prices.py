"""Dollar prices per model, kept as data (`caft/data/prices.yaml`), overridable by a user file.

Lookup order for `provider/model`: the exact key, the bare model name, then the same two with a dated
snapshot suffix removed (`claude-sonnet-4-5-20250929` -> `claude-sonnet-4-5`, `gpt-4.1-2025-04-14` ->
`gpt-4.1`). A model with no price costs `None`; the client counts its tokens and warns once.

Batch prices (OpenAI Batch, Anthropic Message Batches): an entry may give `batch_input_per_mtok` and
`batch_output_per_mtok`; without them a batched token costs `BATCH_DISCOUNT` (0.5) of the standard price,
the discount both providers list for their batch APIs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from caft.errors import ConfigError

_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")

BATCH_DISCOUNT = 0.5
"""Fraction of the standard per-token price a batched request costs when the table gives no batch price."""

_REQUIRED = {"input_per_mtok", "output_per_mtok"}
_OPTIONAL = {"batch_input_per_mtok", "batch_output_per_mtok"}


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float
    batch_input_per_mtok: float | None = None
    batch_output_per_mtok: float | None = None

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6

    def batch(self) -> Price:
        """The price of the same tokens sent through a provider's batch API."""
        return Price(
            self.batch_input_per_mtok
            if self.batch_input_per_mtok is not None
            else self.input_per_mtok * BATCH_DISCOUNT,
            self.batch_output_per_mtok
            if self.batch_output_per_mtok is not None
            else self.output_per_mtok * BATCH_DISCOUNT,
        )


def _parse(data: Any, source: str) -> dict[str, Price]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a price table is a mapping of model -> {{input_per_mtok, output_per_mtok}}"
        )
    out: dict[str, Price] = {}
    for model, entry in data.items():
        if (
            not isinstance(entry, dict)
            or not _REQUIRED <= set(entry) <= _REQUIRED | _OPTIONAL
            or not all(isinstance(v, int | float) and v >= 0 for v in entry.values())
        ):
            raise ConfigError(
                f"{source}: the entry for {model!r} must be {{input_per_mtok: <dollars>, output_per_mtok: "
                "<dollars>}, optionally with batch_input_per_mtok and batch_output_per_mtok, all "
                f"non-negative numbers; got {entry!r}"
            )
        batch_in, batch_out = entry.get("batch_input_per_mtok"), entry.get("batch_output_per_mtok")
        out[str(model)] = Price(
            float(entry["input_per_mtok"]),
            float(entry["output_per_mtok"]),
            None if batch_in is None else float(batch_in),
            None if batch_out is None else float(batch_out),
        )
    return out


def default_prices() -> dict[str, Price]:
    text = resources.files("caft").joinpath("data/prices.yaml").read_text(encoding="utf-8")
    return _parse(yaml.safe_load(text), "caft/data/prices.yaml")


def load_prices(path: str | Path | None = None) -> dict[str, Price]:
    """The built-in table, with the entries of `path` (same YAML shape) added on top."""
    table = default_prices()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"price table {p} not found; give an existing YAML file or leave prices_path unset"
            )
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"price table {p} is not valid YAML: {e}") from e
        table.update(_parse(data, str(p)))
    return table


def find_price(table: dict[str, Price], provider: str, model: str) -> Price | None:
    candidates = [f"{provider}/{model}", model]
    base = _SNAPSHOT.sub("", model)
    if base != model:
        candidates += [f"{provider}/{base}", base]
    for key in candidates:
        if key in table:
            return table[key]
    # A bare model name also matches the same model listed under another provider prefix (a gateway).
    for key, price in table.items():
        if key.split("/", 1)[-1] in (model, base):
            return price
    return None
