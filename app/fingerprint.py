"""What each stage of `caft run` was computed from, so a rerun never presents a stale result as a new one.

A stage's fingerprint holds:
- `version`: the stage's code version (bump `STAGE_VERSIONS` when a stage's outputs change meaning) and caft's;
- `config`: the resolved config sections the stage reads (secrets never live in a config);
- `files`: a digest of every local file or folder those sections name (data, corpus, task, question files, local
  models and adapters);
- `upstream`: for each earlier stage it reads, that stage's fingerprint hash and a digest of its output folder.

The hash does not depend on where the files are: in the hashed copy of `config` a string that names a local file
or folder stands for its digest, so a run folder copied or moved together with its data (a demo seed folder
copied to try another judge) resumes instead of redoing every stage. The recorded fingerprint keeps the paths
(`config`, `files`) for `what_changed`. `path_hash` is the older, path-keyed hash, accepted for stages recorded
before this change.

Digests hash file contents up to `HASH_LIMIT` bytes per file and use (size, mtime) above it, so model weights are
not read in full on every run while subspaces, candidates, dossiers, selections, answers and grades are.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from caft import __version__
from caft.app.run_config import RunConfig
from caft.rundir import DONE_MARKER

FINGERPRINT_FILE = "FINGERPRINT.json"
HASH_LIMIT = 64 * 1024 * 1024

STAGE_VERSIONS: dict[str, int] = {
    "train": 1,
    "diff": 2,  # 2: generic generation prompts that are no evaluation question
    "sae": 1,
    "evidence": 2,  # 2: generic corpus by default, sampled coherence search
    "triage": 1,
    "caft": 1,
    "baselines": 1,
    "eval": 1,
    "report": 1,
}

# The run config's top-level fields each stage reads (besides the ones every stage reads). A name that a run
# config does not have is ignored, so sections can be added without touching this table.
_COMMON = ("model", "seed", "task_kind")
STAGE_CONFIG: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "diff": ("finetuned", "diff", "train"),
    "sae": ("finetuned", "sae", "diff"),
    "evidence": ("finetuned", "evidence", "task"),
    "triage": (
        "finetuned",
        "task",
        "triage",
        "evidence",
    ),
    "caft": ("train", "caft", "diff", "evidence", "triage", "task"),
    "baselines": ("train", "baselines"),
    "eval": ("finetuned", "eval", "eval_models", "classification", "train", "baselines"),
    "report": (),
}

# The earlier stages whose outputs each stage reads.
STAGE_UPSTREAM: dict[str, tuple[str, ...]] = {
    "train": (),
    "diff": ("train",),
    "sae": ("train", "diff"),
    "evidence": ("train", "diff", "sae"),
    "triage": ("train", "diff", "sae", "evidence"),
    "caft": ("triage",),
    "baselines": ("diff", "sae", "triage", "caft"),  # caft: the steps sweep matches its held-out loss
    "eval": ("train", "triage", "caft", "baselines"),
    "report": ("eval",),
}

# Fields that change how a stage reports progress, never what it computes.
_IGNORED_KEYS = frozenset({"progress", "log_every"})
# Files a stage writes about itself rather than as its result.
_SELF_FILES = frozenset({DONE_MARKER, FINGERPRINT_FILE})


def _strip(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _strip(v) for k, v in obj.items() if k not in _IGNORED_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _paths_in(obj: Any) -> Iterable[str]:
    """Every string in a config dump that names an existing local file or folder."""
    if isinstance(obj, Mapping):
        for v in obj.values():
            yield from _paths_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _paths_in(v)
    elif isinstance(obj, str) and obj and len(obj) < 4096 and "\n" not in obj:
        try:
            if Path(obj).exists():
                yield obj
        except OSError:
            return


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of its size and mtime when it is larger than HASH_LIMIT."""
    st = path.stat()
    if st.st_size > HASH_LIMIT:
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def path_digest(path: str | Path, skip: frozenset[str] = frozenset()) -> str:
    """Digest of a file, or of every file under a folder (relative names included); `skip` names top-level
    files to leave out."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = Path(root).relative_to(p)
        for name in sorted(files):
            if (rel_root == Path() and name in skip) or name.startswith("."):
                continue
            f = Path(root) / name
            h.update(f"{(rel_root / name).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def stage_fingerprint(cfg: RunConfig, run_path: Path, stage: str, enabled: Iterable[str]) -> dict[str, Any]:
    """The fingerprint of `stage` given the run config and the outputs of its (enabled) upstream stages."""
    dump = cfg.model_dump(mode="json")
    fields = (*_COMMON, *STAGE_CONFIG.get(stage, ()))
    config = {k: _strip(dump[k]) for k in fields if k in dump}
    files = {p: path_digest(p) for p in sorted(set(_paths_in(config)))}
    on = set(enabled)
    upstream: dict[str, Any] = {}
    for up in STAGE_UPSTREAM.get(stage, ()):
        folder = run_path / up
        if up not in on or not folder.is_dir():
            continue
        recorded = read_fingerprint(folder)
        upstream[up] = {
            "fingerprint": recorded.get("hash") if recorded else None,
            "outputs": path_digest(folder, skip=_SELF_FILES),
        }
    version = {"stage": STAGE_VERSIONS.get(stage, 1), "caft": __version__}
    body = {"version": version, "config": config, "files": files, "upstream": upstream}
    by_content = {"version": version, "config": _by_content(config, files), "upstream": upstream}
    return {"stage": stage, "hash": _hash(by_content), "path_hash": _hash(body), **body}


def _by_content(obj: Any, digests: Mapping[str, str]) -> Any:
    """`obj` with every string that names a local path replaced by that path's digest."""
    if isinstance(obj, Mapping):
        return {k: _by_content(v, digests) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_by_content(v, digests) for v in obj]
    if isinstance(obj, str) and obj in digests:
        return f"<local path {digests[obj]}>"
    return obj


def same_inputs(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether a recorded fingerprint matches a new one (by content; or by the older path-keyed hash)."""
    return old.get("hash") in (new["hash"], new.get("path_hash"))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_fingerprint(stage_dir: Path) -> dict[str, Any] | None:
    p = stage_dir / FINGERPRINT_FILE
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def what_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Readable names of the parts that differ between two fingerprints (e.g. `config.triage`,
    `upstream.triage`, `files:data/train.jsonl`)."""
    out: list[str] = []
    for part in ("version", "config", "files", "upstream"):
        a, b = old.get(part) or {}, new.get(part) or {}
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                out.append(part)
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"files:{key}" if part == "files" else f"{part}.{key}")
    return out
