from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from caft.app.cli import app

HEAVY = ("torch", "transformers", "nnsight", "sae_lens", "peft", "openai", "anthropic")


def run_py(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # cwd outside the checkout so that only the installed package is importable
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_import_does_not_import_heavy_packages(tmp_path: Path) -> None:
    code = (
        "import sys, caft.app.cli\n"
        "from typer.main import get_command\n"
        "get_command(caft.app.cli.app)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    res = run_py(code, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_one_import_namespace(tmp_path: Path) -> None:
    res = run_py(
        "import caft.agent, caft.interp, caft.training, caft.evals, caft.prompts, caft.llm; print('ok')",
        tmp_path,
    )
    assert res.stdout.strip() == "ok", res.stderr
    for name in ("agent", "interp", "training", "evals", "prompts"):
        res = run_py(f"import {name}", tmp_path)
        assert res.returncode != 0 and "No module named" in res.stderr


def test_py_typed_is_shipped() -> None:
    import caft

    assert (Path(caft.__file__).parent / "py.typed").is_file()


def test_version_and_help() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["version"])
    assert res.exit_code == 0 and res.stdout.strip() == "0.1.0"
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "doctor" in res.stdout


def test_doctor_reports_key_presence_never_values(tmp_path: Path) -> None:
    secret = "sk-" + "live-doctor-0123456789abcdefghij"
    env = {**os.environ, "OPENAI_API_KEY": secret, "HF_HUB_OFFLINE": "1"}
    env.pop("ANTHROPIC_API_KEY", None)
    res = subprocess.run(
        [sys.executable, "-m", "caft.app.cli", "doctor"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert secret not in res.stdout + res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    assert lines["OPENAI_API_KEY"].endswith("present")
    assert lines["ANTHROPIC_API_KEY"].endswith("absent")
    assert "torch" in res.stdout and "HF_HUB_OFFLINE" in res.stdout and "cpu:" in res.stdout


def test_config_validate(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  name_or_path: tiny\n")
    runner = CliRunner()
    res = runner.invoke(app, ["config", "validate", str(good), "--set", "seed=5"])
    assert res.exit_code == 0, res.output
    assert "seed: 5" in res.stdout and "name_or_path: tiny" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: tiny\n  kind: decoder\n")
    res = runner.invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 2
    assert "model.kind" in res.output and str(bad) in res.output and "causal_lm" in res.output
    res = runner.invoke(app, ["config", "show"])
    assert res.exit_code == 0 and "model.chat.template" in res.stdout
