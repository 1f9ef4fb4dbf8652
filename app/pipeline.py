"""`caft run`: every stage of a CAFT run in order, from one config, resumable.

    train     baseline fine-tune of the base model (skipped when `finetuned` is given)
    diff      base vs fine-tuned activations on the same tokens -> streaming PCA -> candidates
    sae       SAE latent rankings (only when the `sae` section lists SAEs)
    evidence  one dossier per candidate
    triage    the judge: verdicts -> selection -> subspace
    caft      fine-tune again with the subspace ablated
    eval      misalignment / code (chat) or ID / OOD accuracy (classification) of the models
    report    markdown + HTML comparison of the evaluated models

A stage whose completion marker (`<stage>/DONE.json`) exists is skipped; one that stopped part way resumes
from its own files (every stage function resumes). `--from STAGE` clears the markers of that stage and the
ones after it, so they run again; `--only STAGE` runs one stage. `summary.json` holds per-stage timing and the
key figures, rewritten after every stage.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from caft.app.run_config import RunConfig
from caft.app.stages import OFFLINE_JUDGE, STAGE_FUNCS, STAGES, RunContext, uses_offline_judge
from caft.errors import ConfigError
from caft.rundir import RunDir, atomic_write_json

if TYPE_CHECKING:
    from caft.llm.types import Provider

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def enabled_stages(cfg: RunConfig) -> list[str]:
    out = []
    for name in STAGES:
        if name == "train" and cfg.finetuned is not None:
            continue
        if name == "sae" and (cfg.sae is None or not cfg.sae.saes):
            continue
        out.append(name)
    return out


def run_pipeline(
    cfg: RunConfig,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    judge_provider: Provider | None = None,
    grade_client_factory: Any = None,
    config_source: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) every enabled stage; returns the summary (also written to `<out_dir>/summary.json`)."""
    stages = enabled_stages(cfg)
    for name in (from_stage, only):
        if name is not None and name not in stages:
            raise ConfigError(
                f"unknown or disabled stage {name!r}; this run's stages are: {', '.join(stages)}"
            )
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
    if from_stage is not None:
        for name in stages[stages.index(from_stage) :]:
            run.stage(name).invalidate()
    summary = _load_summary(run)
    summary.update({"name": cfg.name, "task_kind": cfg.task_kind, "stages_enabled": stages})
    todo = [only] if only is not None else stages
    for name in todo:
        stage = run.stage(name)
        if stage.done and only is None:
            log.info("stage %s: done, skipped", name)
            continue
        log.info("stage %s: running", name)
        started = time.time()
        info = STAGE_FUNCS[name](ctx)
        seconds = round(time.time() - started, 2)
        stage.mark_done(info, started=started)
        summary.setdefault("stages", {})[name] = {"seconds": seconds, **info}
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
