"""`caft run`: every stage of a CAFT run in order, from one config, resumable, never stale.

    train     baseline fine-tune of the base model (skipped when `finetuned` is given)
    diff      base vs fine-tuned activations on the same tokens -> streaming PCA -> candidates
    sae       SAE latent rankings (only when the `sae` section lists SAEs)
    evidence  one dossier per candidate
    triage    the judge: verdicts -> selection -> subspace
    caft      fine-tune again with the subspace ablated
    eval      misalignment / code (chat) or ID / OOD accuracy (classification) of the models
    report    markdown + HTML comparison of the evaluated models

Each stage records what it was computed from (`<stage>/FINGERPRINT.json`, see `caft.app.fingerprint`) before it
starts. On a rerun a finished stage with the same fingerprint is skipped, and a partial one resumes from its own
files. A stage whose fingerprint differs is redone from scratch, and so is every later stage: the old folder is
moved to `RUN/.superseded/<stage>-<time>/`, never deleted. `--from STAGE` redoes that stage and every later one
the same way; `--only STAGE` runs one stage. One process at a time writes a run directory (`.caft.lock`). `summary.json` holds per-stage timing, fingerprints and the key
figures, rewritten after every stage.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.app.fingerprint import (
    FINGERPRINT_FILE,
    read_fingerprint,
    same_inputs,
    stage_fingerprint,
    what_changed,
)
from caft.app.preflight import preflight, raise_if_problems
from caft.app.run_config import RunConfig
from caft.app.stages import OFFLINE_JUDGE, STAGE_FUNCS, STAGES, RunContext, uses_offline_judge
from caft.errors import ConfigError
from caft.rundir import SUMMARY_FILE, RunDir, RunLayout, atomic_write_json, lock_dir

if TYPE_CHECKING:
    from caft.llm.types import Provider

log = logging.getLogger(__name__)

SUPERSEDED_DIR = ".superseded"


def enabled_stages(cfg: RunConfig) -> list[str]:
    out = []
    for name in STAGES:
        if name == "train" and cfg.finetuned is not None:
            continue
        if name == "sae" and (cfg.sae is None or not cfg.sae.saes):
            continue
        out.append(name)
    return out


def supersede(stage_dir: Path) -> Path | None:
    """Move a stage folder aside (to `RUN/.superseded/<stage>-<time>/`) so the stage runs from scratch; nothing
    is deleted. Returns the new location, or None when there was no folder."""
    if not stage_dir.exists():
        return None
    dest_root = stage_dir.parent / SUPERSEDED_DIR
    dest_root.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = dest_root / f"{stage_dir.name}-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest_root / f"{stage_dir.name}-{stamp}-{n}"
    stage_dir.rename(dest)
    return dest


def run_pipeline(
    cfg: RunConfig,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    judge_provider: Provider | None = None,
    grade_client_factory: Any = None,
    config_source: str | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every enabled stage; returns the summary (also written to `<out_dir>/summary.json`).

    First, unless `check` is False, pre-flight (`caft.app.preflight`) checks the judges, data, model configs and
    layers that the stages about to run need, and raises one `PreflightError` listing every problem."""
    stages = enabled_stages(cfg)
    for name in (from_stage, only):
        if name is not None and name not in stages:
            raise ConfigError(
                f"unknown or disabled stage {name!r}; this run's stages are: {', '.join(stages)}"
            )
    redo = set(stages[stages.index(from_stage) :]) if from_stage is not None else set()
    todo = [only] if only is not None else stages
    if check:
        pending = [n for n in todo if n in redo or not RunLayout(cfg.out_dir).marker(n).is_file()]
        raise_if_problems(
            preflight(
                cfg,
                pending,
                check_triage_judge=judge_provider is None,
                check_eval_judge=grade_client_factory is None,
            )
        )
    with lock_dir(cfg.out_dir, "caft run"):
        return _run_locked(
            cfg, stages, redo, todo, from_stage, only, judge_provider, grade_client_factory, config_source
        )


def _run_locked(
    cfg: RunConfig,
    stages: list[str],
    redo: set[str],
    todo: list[str],
    from_stage: str | None,
    only: str | None,
    judge_provider: Provider | None,
    grade_client_factory: Any,
    config_source: str | None,
) -> dict[str, Any]:
    run = RunDir.create(
        cfg.out_dir,
        config=cfg,
        models={
            "base": cfg.model.name_or_path,
            **({"finetuned": cfg.finetuned.name_or_path} if cfg.finetuned else {}),
        },
        judges={
            "triage": OFFLINE_JUDGE if uses_offline_judge(cfg) else cfg.triage.judge.model,
            "eval": cfg.eval.grade.judge.model,
        },
        extra={"config_source": config_source} if config_source else None,
    )
    ctx = RunContext(cfg, run, judge_provider=judge_provider, grade_client_factory=grade_client_factory)
    summary = _load_summary(run)
    summary.update({"name": cfg.name, "task_kind": cfg.task_kind, "stages_enabled": stages})
    redone_upstream: str | None = None
    for name in todo:
        stage = run.stage(name)
        fp = stage_fingerprint(cfg, run.path, name, stages)
        old = read_fingerprint(stage.path)
        why: str | None = None
        if name in redo:
            why = f"--from {from_stage}"
        elif redone_upstream is not None:
            why = f"the earlier stage {redone_upstream} was redone"
        elif stage.path.exists() and old is None:
            why = "its folder has no fingerprint (written by an older caft, or not by `caft run`)"
        elif old is not None and not same_inputs(old, fp):
            why = "its inputs changed: " + ", ".join(what_changed(old, fp)[:8])
        if why is not None and stage.path.exists():
            moved = supersede(stage.path)
            log.warning("stage %s: redoing it (%s); the old folder is kept at %s", name, why, moved)
        if why is not None and only is None:
            redone_upstream = redone_upstream or name
        if stage.done and why is None:
            log.info("stage %s: done with the same inputs, skipped", name)
            summary.setdefault("stages", {}).setdefault(name, {})["fingerprint"] = fp["hash"]
            continue
        resuming = stage.path.exists()
        log.info("stage %s: %s", name, "resuming" if resuming else "running")
        stage.ensure()
        atomic_write_json(stage.path / FINGERPRINT_FILE, fp)
        started = time.time()
        info = STAGE_FUNCS[name](ctx)
        seconds = round(time.time() - started, 2)
        stage.mark_done({**info, "fingerprint": fp["hash"]}, started=started)
        summary.setdefault("stages", {})[name] = {"seconds": seconds, "fingerprint": fp["hash"], **info}
        atomic_write_json(run.path / SUMMARY_FILE, summary)
        log.info("stage %s: finished in %.1f s", name, seconds)
    summary["complete"] = all(run.stage(n).done for n in stages)
    atomic_write_json(run.path / SUMMARY_FILE, summary)
    return summary


def _load_summary(run: RunDir) -> dict[str, Any]:
    p = run.path / SUMMARY_FILE
    if p.is_file():
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return {}
