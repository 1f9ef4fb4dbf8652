"""One judge contract for the triage stage, whichever judge makes the verdicts.

A `Judge` reads candidate dossiers and the task description and appends one `VerdictRecord` per verdict to
`<out_dir>/verdicts.jsonl` (a rerun resumes from that file). It may also ask for random control directions
(`controls_per_layer`): the stage gives them evidence like the candidates and passes their dossiers as
`controls`, which a judge uses for calibration only. `run_triage` then applies the selection policy to the
candidates alone.

    single             SingleLLMJudge (caft.agent.single): one LLM verdict per candidate
    agent              AgentJudge (caft.agent.loop): a tool-using LLM session over all candidates
    offline-embedding  OfflineEmbeddingJudge (caft.agent.offline): embedding similarity, no API

The LLM judges read the controls blind, like candidates; `calibrate` then sets the selection threshold from
their scores (at most `triage.calibration.alpha` of the random directions may reach it), as the offline judge
calibrates its own scores against them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from caft.agent.config import OFFLINE_KIND, SelectionPolicy, TriageConfig
from caft.agent.schema import VERDICTS_FILE, TaskDescription, VerdictRecord
from caft.errors import CaftError

if TYPE_CHECKING:
    import torch

    from caft.agent.steer import Steerer
    from caft.interp.schema import Dossier
    from caft.llm import LLMClient, Provider


@dataclass
class JudgeRun:
    """What one judging pass produced."""

    records: list[VerdictRecord]
    """The records written by this pass (candidates and, for judges that judge them, controls)."""
    complete: bool
    """Every candidate the judge meant to judge has a record, and no budget cut the pass short."""
    chosen: set[str] | None = None
    """The agent's final picks (None for judges without picks, or an agent that did not finish)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Counts, usage and dollars, merged into the stage's summary.json."""


class Judge(Protocol):
    """The contract every triage judge meets."""

    name: str
    """The judge's id in verdict records and summaries (a model id, or `offline-embedding`)."""
    controls_per_layer: int
    """Random control directions per layer it wants dossiers of (0: none)."""

    async def judge(
        self,
        dossiers: Sequence[Dossier],
        task: TaskDescription,
        out_dir: Path,
        *,
        controls: Sequence[Dossier] = (),
        directions: Mapping[str, torch.Tensor] | None = None,
    ) -> JudgeRun:
        """Judge `dossiers` (the candidates) into `out_dir`; `controls` are random directions' dossiers, and
        `directions` the candidates' vectors for judges that inspect them live."""
        ...


def make_judge(
    cfg: TriageConfig, *, provider: Provider | None = None, steerer: Steerer | None = None
) -> Judge:
    """The judge `cfg.kind` names; `provider` replaces the LLM provider `cfg.judge.model` names (tests, demos),
    `steerer` enables the agent's live steering."""
    controls = cfg.resolved_controls()
    if cfg.kind == OFFLINE_KIND:
        from caft.agent.offline import OfflineEmbeddingJudge

        return OfflineEmbeddingJudge(cfg.offline, controls_per_layer=controls)
    if cfg.kind == "agent":
        from caft.agent.loop import AgentJudge

        return AgentJudge(cfg, provider=provider, steerer=steerer, controls_per_layer=controls)
    from caft.agent.single import SingleLLMJudge

    return SingleLLMJudge(cfg, provider=provider, controls_per_layer=controls)


def open_client(cfg: TriageConfig, out_dir: Path, provider: Provider | None) -> LLMClient:
    """The LLM client of an LLM judge, logging and caching into the stage folder."""
    from caft.llm import LLMClient

    return LLMClient.from_config(cfg.judge, run_dir=out_dir, stage="triage", provider=provider)


def refused(model_id: str, out_dir: Path, err: Exception) -> CaftError:
    """The error for a request the provider refuses for good (key, model name, URL)."""
    return CaftError(
        f"the judge {model_id} refused the request: {err}. Fix the cause (API key, model name, base URL) "
        f"and rerun: the verdicts already in {out_dir / VERDICTS_FILE} are kept and skipped"
    )


def control_score(records: Sequence[VerdictRecord], policy: SelectionPolicy) -> float | None:
    """A random control's undesired score on the selection's scale: the mean undesired confidence over its
    verdicts (0 for any other relation), or its mean relevance with `score: relevance`; None when unscored."""
    if policy.score == "relevance":
        rel = [r.relevance for r in records if r.relevance is not None]
        return sum(rel) / len(rel) if rel else None
    judged = [r.verdict for r in records if r.verdict is not None]
    if not judged:
        return None
    return sum(v.confidence if v.relation == "undesired" else 0.0 for v in judged) / len(judged)


def calibrate(
    records: Sequence[VerdictRecord], control_ids: set[str], policy: SelectionPolicy, alpha: float
) -> tuple[SelectionPolicy, dict[str, Any]]:
    """The policy with its threshold raised so that at most `alpha` of the random controls reach it.

    With the controls' scores sorted high to low and m = floor(alpha * n), the calibrated threshold lies just
    above the (m + 1)-th highest score; the policy's own threshold stays the floor. Returns the policy and what
    was done (recorded in the selection and the summary)."""
    by_id: dict[str, list[VerdictRecord]] = {}
    for r in records:
        if r.candidate in control_ids:
            by_id.setdefault(r.candidate, []).append(r)
    scores = sorted(
        (s for rs in by_id.values() if (s := control_score(rs, policy)) is not None), reverse=True
    )
    relevance = policy.score == "relevance"
    floor = policy.relevance_threshold if relevance else policy.threshold
    top = 100.0 if relevance else 1.0
    info: dict[str, Any] = {"alpha": alpha, "controls": len(control_ids), "scored": len(scores)}
    if not scores:
        info |= {"threshold": floor, "note": "no scored control verdicts: the policy's threshold is kept"}
        return policy, info
    m = math.floor(alpha * len(scores))
    cut = scores[m] if m < len(scores) else 0.0
    calibrated = min(top, round(cut + top * 1e-3, 4)) if cut > 0 else 0.0
    used = max(floor, calibrated)
    info |= {
        "calibrated_threshold": calibrated,
        "policy_threshold": floor,
        "threshold": used,
        "control_fpr": sum(s >= used for s in scores) / len(scores),
        "control_scores": [round(s, 4) for s in scores],
    }
    if cut >= top:
        info["note"] = "controls reach the top score: the judge cannot tell random directions apart"
    field_name = "relevance_threshold" if relevance else "threshold"
    return policy.model_copy(update={field_name: used}), info
