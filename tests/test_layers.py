"""The layering contracts (pyproject [tool.importlinter]) hold, and an upward import breaks them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "lint-imports"
FOLDERS = ("app", "agent", "interp", "training", "evals", "prompts")

pytest.importorskip("importlinter")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), str(root)], capture_output=True, text=True, env=env, timeout=300
    )


def _copy_with(tmp: Path, folder: str, module: str, extra_line: str) -> Path:
    """A checkout made of symlinks into this one, except `folder/module`, which gets `extra_line` appended."""
    root = tmp / "repo"
    root.mkdir()
    (root / "pyproject.toml").symlink_to(REPO / "pyproject.toml")
    for name in ("caft", *FOLDERS):
        if name != folder:
            (root / name).symlink_to(REPO / name)
    (root / folder).mkdir()
    for f in (REPO / folder).iterdir():
        if f.name != module:
            (root / folder / f.name).symlink_to(f)
    text = (REPO / folder / module).read_text(encoding="utf-8")
    (root / folder / module).write_text(text + "\n" + extra_line + "\n", encoding="utf-8")
    return root


def test_contracts_are_kept() -> None:
    res = _lint(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 kept, 0 broken" in res.stdout


@pytest.mark.parametrize(
    ("folder", "module", "line", "contract"),
    [
        ("caft", "subspace.py", "from caft.agent import schema as _upward", "foundation"),
        ("interp", "pca.py", "import caft.evals.metrics as _upward", "stages import downwards only"),
        ("agent", "selection.py", "from caft.app import pipeline as _upward", "stages import downwards only"),
        ("training", "trainer.py", "from caft.testing import tiny_model as _fixture", "test fixtures"),
    ],
)
def test_an_upward_import_breaks_a_contract(
    tmp_path: Path, folder: str, module: str, line: str, contract: str
) -> None:
    res = _lint(_copy_with(tmp_path, folder, module, line))
    assert res.returncode != 0
    assert "BROKEN" in res.stdout
    # a contract with ignored imports reads "... BROKEN (2 ignored imports)"
    broken = [ln for ln in res.stdout.splitlines() if re.search(r" BROKEN( \(\d+ ignored imports?\))?$", ln)]
    assert any(contract in ln for ln in broken), res.stdout
