"""The triage stage end to end: dossiers + task -> verdicts (single or agent) -> selection -> subspace.

Output folder (default `<run>/triage` next to `<run>/evidence`)::

    triage.json        inputs: evidence folder, directions file, task, judge, mode, resolved config
    verdicts.jsonl     one VerdictRecord per line (appended as they come; a rerun resumes)
    exchanges.jsonl    single mode: the raw judge exchange of every verdict
    transcript.jsonl   agent mode: every message, tool call and result
    agent_result.json  agent mode: finished or why it stopped, the agent's picks, the hypothesis board
    llm_calls.jsonl    the LLM client's call log; llm_cache.sqlite its response cache
    selection.json     the policy's choice; subspace/ the artifact built from it
    summary.json       counts (judged, unscored by reason), usage and dollars, the selection's notes
    DONE.json          written only when every candidate has a record and no budget cut the run short
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.agent.config import TriageConfig
from caft.agent.review import INFO_FILE
from caft.agent.schema import VERDICTS_FILE, Selection
from caft.agent.selection import (
    find_directions,
    load_verdicts,
    prefilter_rank,
    read_selection,
    select,
    write_selection,
)
from caft.agent.task import load_task
from caft.errors import CaftError, ConfigError, DataError
from caft.interp.schema import load_directions, load_dossiers
from caft.rundir import RunDir, atomic_write_json

if TYPE_CHECKING:
    import torch

    from caft.agent.steer import Steerer
    from caft.interp.schema import Dossier
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


def run_triage(
    cfg: TriageConfig,
    evidence_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    directions_path: str | Path | None = None,
    provider: Provider | None = None,
    steerer: Steerer | None = None,
) -> TriageResult:
    """Run the stage (synchronously); `provider` replaces the one `cfg.judge.model` names (tests, demos)."""
    return asyncio.run(
        run_triage_async(
            cfg, evidence_dir, out_dir, directions_path=directions_path, provider=provider, steerer=steerer
        )
    )


async def run_triage_async(
    cfg: TriageConfig,
    evidence_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    directions_path: str | Path | None = None,
    provider: Provider | None = None,
    steerer: Steerer | None = None,
) -> TriageResult:
    from caft.agent.loop import AgentSession
    from caft.agent.single import SingleJudge
    from caft.llm import FatalError, LLMClient

    started = time.time()
    ev = Path(evidence_dir)
    if cfg.task is None:
        raise ConfigError(
            "no task description: pass --task (a YAML file, or emergent-misalignment / spurious-correlation) "
            "or set triage.task"
        )
    task = load_task(cfg.task)
    if cfg.mode == "single" and cfg.samples > 1 and cfg.temperature == 0:
        log.warning(
            "samples=%d at temperature 0: the samples will barely differ; raise the temperature", cfg.samples
        )
    dossiers = load_dossiers(ev)
    dpath = Path(directions_path) if directions_path is not None else find_directions(ev)
    if dpath is not None and not dpath.is_file():
        raise DataError(f"directions file {dpath} not found; pass the diff stage's directions.safetensors")
    directions: dict[str, torch.Tensor] | None = load_directions(dpath) if dpath is not None else None
    out = Path(out_dir) if out_dir is not None else ev.resolve().parent / "triage"
    stage = RunDir(out.parent).stage(out.name)
    stage.ensure()
    stage.invalidate()
    atomic_write_json(
        out / INFO_FILE,
        {
            "evidence": str(ev.resolve()),
            "directions": str(dpath) if dpath else None,
            "task": task.name,
            "judge": cfg.judge.model,
            "mode": cfg.mode,
            "candidates": len(dossiers),
            "config": cfg.model_dump(mode="json"),
        },
    )
    client = LLMClient.from_config(cfg.judge, run_dir=out, stage="triage", provider=provider)
    summary: dict[str, Any] = {"mode": cfg.mode, "judge": client.model_id, "task": task.name}
    chosen: set[str] | None = None
    judged_ids: set[str] = set()
    async with client:
        try:
            if cfg.mode == "single":
                todo = _prefilter(cfg, dossiers, out, summary)
                outcome = await SingleJudge(client, task, cfg, out).run(todo, samples=cfg.samples)
                judged_ids = {d.candidate.id for d in todo}
                summary |= outcome.summary()
                stopped = outcome.stopped
            else:
                session = AgentSession(
                    client, task, dossiers, cfg, out, directions=directions, steerer=steerer
                )
                agent = await session.run()
                summary |= agent.summary()
                stopped = agent.stopped
                chosen = set(agent.chosen) if agent.finished else None
        except FatalError as e:
            raise CaftError(
                f"the judge {client.model_id} refused the request: {e}. Fix the cause (API key, model name, "
                f"base URL) and rerun: the verdicts already in {out / VERDICTS_FILE} are kept and skipped"
            ) from None
        summary["usage"] = client.usage.model_dump(mode="json")
    records = load_verdicts(out / VERDICTS_FILE) if (out / VERDICTS_FILE).is_file() else []
    selection = select(records, [d.candidate for d in dossiers], cfg.selection, chosen=chosen)
    selection.directions = str(dpath) if dpath else None
    selection.model = _model_id(dossiers)
    sub: Subspace | None = None
    if directions is not None:
        sub = write_selection(out, selection, directions, model=selection.model)
    else:
        atomic_write_json(out / "selection.json", selection.model_dump(mode="json"))
        log.warning(
            "no directions file found next to %s: wrote selection.json only; build the subspace "
            "with `caft triage apply selection.json --directions PATH`",
            ev,
        )
    judged = {r.candidate for r in records if r.verdict is not None or r.unscored is not None}
    if cfg.mode == "agent":  # the agent judges what it chooses to; it is done when it called finish
        complete = chosen is not None
    else:
        complete = stopped is None and judged_ids <= judged
    summary["selected"] = len(selection.selected)
    summary["subspace_dims"] = sub.total_dims if sub is not None else None
    summary["selection_notes"] = selection.notes
    summary["complete"] = complete
    atomic_write_json(out / SUMMARY_FILE, summary)
    if complete:
        stage.mark_done({"selected": len(selection.selected), "mode": cfg.mode}, started=started)
    return TriageResult(out, selection, sub, summary, complete)


def _prefilter(
    cfg: TriageConfig, dossiers: list[Dossier], out: Path, summary: dict[str, Any]
) -> list[Dossier]:
    """The dossiers the LLM judges: all, or the top-k by the pre-filter's verdicts."""
    pf = cfg.prefilter
    if pf.top_k is None:
        return dossiers
    path = Path(pf.verdicts) if pf.verdicts is not None else out / VERDICTS_FILE
    if not path.is_file():
        raise DataError(f"prefilter: {path} not found; run the offline judge first or set prefilter.verdicts")
    ranked = prefilter_rank(load_verdicts(path), pf.method)
    if not ranked:
        raise DataError(f"prefilter: {path} holds no verdicts of method {pf.method!r}; run that judge first")
    keep = set(ranked[: pf.top_k])
    chosen = [d for d in dossiers if d.candidate.id in keep]
    summary["prefilter"] = {"method": pf.method, "kept": len(chosen), "skipped": len(dossiers) - len(chosen)}
    log.info(
        "prefilter: the LLM judges %d of %d candidates (top by %s)", len(chosen), len(dossiers), pf.method
    )
    return chosen


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
    from caft.agent.selection import build_subspace

    sub = build_subspace(sel, load_directions(Path(dpath)), model=sel.model)
    sub.save(target)
    return sel, sub, target
