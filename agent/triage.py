"""The triage stage end to end: dossiers + task -> verdicts (any `Judge`) -> selection -> subspace.

Output folder (default `<run>/triage` next to `<run>/evidence`)::

    triage.json        inputs: evidence and controls folders, directions files, task, judge, kind, config
    verdicts.jsonl     one VerdictRecord per line (appended as they come; a rerun resumes)
    exchanges.jsonl    single mode: the raw judge exchange of every verdict
    transcript.jsonl   agent mode: every message, tool call and result
    agent_result.json  agent mode: finished or why it stopped, the agent's picks, the hypothesis board
    llm_calls.jsonl    the LLM client's call log; llm_cache.sqlite its response cache
    selection.json     the policy's choice; subspace/ the artifact built from it
    summary.json       counts (judged, unscored by reason, controls read as undesired), usage and dollars,
                       the selection's notes
    DONE.json          written only when the judge is complete (every candidate has a record and no budget
                       cut the run short; the agent called finish)

Control dossiers (random directions) are judged or used for calibration, never selected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.agent.config import OFFLINE_KIND, SelectionPolicy, TriageConfig
from caft.agent.judges import Judge, calibrate, make_judge
from caft.agent.review import INFO_FILE
from caft.agent.schema import SELECTION_FILE, VERDICTS_FILE, Selection, VerdictRecord
from caft.agent.selection import (
    build_subspace,
    find_directions,
    load_verdicts,
    read_selection,
    select,
    write_selection,
)
from caft.agent.task import load_task
from caft.errors import CaftError, ConfigError, DataError
from caft.interp.schema import Dossier, load_directions, load_dossiers
from caft.rundir import RunDir, atomic_write_json

if TYPE_CHECKING:
    import torch

    from caft.agent.steer import Steerer
    from caft.llm import Provider
    from caft.subspace import Subspace

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


@dataclass
class TriageResult:
    out_dir: Path
    selection: Selection
    subspace: Subspace | None
    summary: dict[str, Any]
    complete: bool


def _model_id(dossiers: list[Any]) -> str | None:
    prov = dossiers[0].provenance if dossiers else {}
    for key in ("base", "base_model", "model"):
        if isinstance(prov.get(key), str):
            return str(prov[key])
    return None


PathArg = str | Path


def run_triage(
    cfg: TriageConfig,
    evidence_dir: PathArg,
    out_dir: PathArg | None = None,
    *,
    controls_dir: PathArg | None = None,
    directions_path: PathArg | list[PathArg] | None = None,
    n_layers: int | None = None,
    judge: Judge | None = None,
    provider: Provider | None = None,
    steerer: Steerer | None = None,
) -> TriageResult:
    """Run the stage (synchronously). `evidence_dir`: the candidates' evidence (or its dossiers/ folder);
    `controls_dir`: the evidence of random control directions, for a judge that calibrates against them;
    `directions_path`: the candidates' directions file(s) (default: found next to the evidence); `n_layers`:
    the model's layer count, recorded in the subspace; `judge` replaces the one `cfg.kind` names, `provider`
    the LLM provider `cfg.judge.model` names (tests, demos)."""
    return asyncio.run(
        run_triage_async(
            cfg,
            evidence_dir,
            out_dir,
            controls_dir=controls_dir,
            directions_path=directions_path,
            n_layers=n_layers,
            judge=judge,
            provider=provider,
            steerer=steerer,
        )
    )


async def run_triage_async(
    cfg: TriageConfig,
    evidence_dir: PathArg,
    out_dir: PathArg | None = None,
    *,
    controls_dir: PathArg | None = None,
    directions_path: PathArg | list[PathArg] | None = None,
    n_layers: int | None = None,
    judge: Judge | None = None,
    provider: Provider | None = None,
    steerer: Steerer | None = None,
) -> TriageResult:
    started = time.time()
    ev = Path(evidence_dir)
    if cfg.task is None:
        raise ConfigError(
            "no task description: pass --task (a YAML file, or emergent-misalignment / spurious-correlation) "
            "or set triage.task"
        )
    task = load_task(cfg.task)
    judge = judge if judge is not None else make_judge(cfg, provider=provider, steerer=steerer)
    dossiers = load_dossiers(ev)
    controls = _load_controls(controls_dir, dossiers, judge)
    dpaths = _direction_paths(ev, directions_path)
    directions: dict[str, torch.Tensor] | None = None
    if dpaths:
        directions = {}
        for dp in dpaths:
            directions.update(load_directions(dp))
    out = Path(out_dir) if out_dir is not None else ev.resolve().parent / "triage"
    stage = RunDir(out.parent).stage(out.name)
    stage.ensure()
    stage.invalidate()
    atomic_write_json(
        out / INFO_FILE,
        {
            "evidence": str(ev.resolve()),
            "controls": str(Path(controls_dir).resolve()) if controls_dir is not None else None,
            "directions": [str(p) for p in dpaths],
            "task": task.name,
            "kind": cfg.kind,
            "judge": judge.name,
            "candidates": len(dossiers),
            "config": cfg.model_dump(mode="json"),
        },
    )
    run = await judge.judge(dossiers, task, out, controls=controls, directions=directions)
    summary: dict[str, Any] = {"kind": cfg.kind, "judge": judge.name, "task": task.name}
    summary |= run.summary
    records = load_verdicts(out / VERDICTS_FILE) if (out / VERDICTS_FILE).is_file() else []
    control_ids = {d.candidate.id for d in controls}
    policy, calibration = cfg.selection, None
    if controls and cfg.kind != OFFLINE_KIND and cfg.calibration.enabled:
        policy, calibration = calibrate(records, control_ids, cfg.selection, cfg.calibration.alpha)
        summary["calibration"] = calibration
        log.info("threshold from %d random controls: %s", len(controls), calibration.get("threshold"))
    if controls:
        summary["controls"] = _control_summary(
            [r for r in records if r.candidate in control_ids], policy, controls
        )
    records = [r for r in records if r.candidate not in control_ids]
    selection = select(records, [d.candidate for d in dossiers], policy, chosen=run.chosen)
    selection.calibration = calibration
    selection.directions = str(dpaths[0]) if len(dpaths) == 1 else None
    selection.model = _model_id(dossiers)
    sub: Subspace | None = None
    if directions is not None:
        sub = write_selection(out, selection, directions, model=selection.model, n_layers=n_layers)
    else:
        atomic_write_json(out / SELECTION_FILE, selection.model_dump(mode="json"))
        log.warning(
            "no directions file found next to %s: wrote selection.json only; build the subspace "
            "with `caft triage apply selection.json --directions PATH`",
            ev,
        )
    summary["selected"] = len(selection.selected)
    summary["subspace_dims"] = sub.total_dims if sub is not None else None
    summary["selection_notes"] = selection.notes
    summary["complete"] = run.complete
    atomic_write_json(out / SUMMARY_FILE, summary)
    if run.complete:
        stage.mark_done({"selected": len(selection.selected), "kind": cfg.kind}, started=started)
    return TriageResult(out, selection, sub, summary, run.complete)


def _load_controls(folder: PathArg | None, dossiers: list[Dossier], judge: Judge) -> list[Dossier]:
    if folder is None:
        if judge.controls_per_layer > 0:
            log.info("the %s judge asks for controls, but none were given", judge.name)
        return []
    controls = load_dossiers(folder)
    both = {d.candidate.id for d in dossiers} & {d.candidate.id for d in controls}
    if both:
        raise DataError(
            f"{folder}: control dossiers share ids with the candidates ({sorted(both)[:5]}); the controls "
            "must be a separate evidence folder of random directions"
        )
    return controls


def _direction_paths(ev: Path, given: PathArg | list[PathArg] | None) -> list[Path]:
    if given is None:
        found = find_directions(ev)
        return [found] if found is not None else []
    paths = [Path(p) for p in (given if isinstance(given, list) else [given])]
    for p in paths:
        if not p.is_file():
            raise DataError(f"directions file {p} not found; pass the diff stage's directions.safetensors")
    return paths


def _control_summary(
    records: list[VerdictRecord], policy: SelectionPolicy, controls: list[Dossier]
) -> dict[str, Any]:
    """How the judge read the random directions (at the threshold used): a judge that calls them undesired
    is not to be trusted."""
    thr = policy.threshold
    undesired = {
        r.candidate
        for r in records
        if r.verdict is not None and r.verdict.relation == "undesired" and r.verdict.confidence >= thr
    }
    return {"n": len(controls), "judged": len({r.candidate for r in records}), "undesired": len(undesired)}


def apply_selection(
    selection_path: str | Path,
    directions_path: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> tuple[Selection, Subspace, Path]:
    """Build the subspace of an (edited) selection.json; returns the selection, subspace and its folder."""
    sel = read_selection(selection_path)
    dpath = directions_path or sel.directions
    if dpath is None:
        raise CaftError(
            f"{selection_path} does not name its directions file; pass --directions PATH (the diff stage's "
            "directions.safetensors)"
        )
    if not Path(dpath).is_file():
        raise DataError(f"directions file {dpath} not found; pass --directions PATH")
    sel_path = Path(selection_path)
    target = (
        Path(out_dir)
        if out_dir is not None
        else (sel_path if sel_path.is_dir() else sel_path.parent) / "subspace"
    )
    sub = build_subspace(sel, load_directions(Path(dpath)), model=sel.model)
    sub.save(target)
    return sel, sub, target
