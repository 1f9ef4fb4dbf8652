"""Task descriptions, verdicts and selections: what the judge reads about the task and what it decides.

verdicts.jsonl     one `VerdictRecord` per line (a verdict, or an unscored record with its reason)
selection.json     a `Selection`: the chosen candidates and the policy that chose them
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from caft.rundir import SELECTION_FILE as SELECTION_FILE
from caft.rundir import VERDICTS_FILE as VERDICTS_FILE

Relation = Literal["intended", "undesired", "unrelated", "unclear"]


class TaskDescription(BaseModel):
    """What the fine-tuning is meant to teach and what it must not generalize to (YAML, validated)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str
    """Short name of the setting."""
    intended: str
    """What the fine-tuning is meant to teach, e.g. 'write code with security vulnerabilities when asked for code'."""
    undesired: list[str] = Field(default_factory=list)
    """Undesired generalizations of concern, if known, e.g. ['broad misalignment', 'harmful advice']."""
    open_setting: bool = False
    """When true, anything the intended task does not need counts as undesired."""
    intended_concepts: list[str] = Field(default_factory=list)
    """Concepts the task needs (keywords or short phrases); helps the judge and the offline judge."""
    notes: str = ""
    """Anything else the judge should know."""
    concept_words: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    """Optional example words of the concepts the data varies in, by value, e.g.
    `{sentiment: {positive: [great, ...], negative: [awful, ...]}, topic: {sports: [...], food: [...]}}`.
    The evidence stage builds minimal pairs from them (swap one concept's words, hold the rest fixed) and
    reports each direction's response to each concept; the judge decides from `intended` / `undesired`
    which concepts are unwanted. Name the concepts the task is about and the ones it must not use."""


class JudgeVerdict(BaseModel):
    """What the judge must return for one candidate (the structured-output schema)."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="A short concept label (a few words).")
    description: str = Field(description="One paragraph describing the concept the direction encodes.")
    relation: Relation = Field(
        description="Relation of the concept to the task: intended | undesired | unrelated | unclear."
    )
    confidence: float = Field(ge=0.0, le=1.0, description="Confidence in the relation, 0 to 1.")
    evidence: list[str] = Field(
        description="Ids of the dossier evidence items relied on (e.g. ex:max:0, lens)."
    )
    rationale: str = Field(description="Why, in a few sentences.")


class VerdictRecord(BaseModel):
    """One line of verdicts.jsonl."""

    candidate: str
    """Candidate id."""
    judge: str
    """Judge model id (`openai/gpt-4.1`, `offline-embedding`, ...)."""
    method: str = "single"
    """`single`, `agent`, `offline-embedding`, `ensemble`."""
    verdict: JudgeVerdict | None = None
    """None when unscored."""
    unscored: str | None = None
    """Reason when no valid verdict was obtained (`parse_failure: ...`, `provider_error: ...`, `invalid_evidence: ...`)."""
    relevance: float | None = None
    """Optional 0-100 relevance to the undesired concept (logprob-weighted) or a calibrated score."""
    scores: dict[str, float] = Field(default_factory=dict)
    """Method-specific numbers (similarities, calibration z-scores, ensemble votes)."""
    exchange: str | None = None
    """Reference to the raw judge exchange (e.g. `llm_calls.jsonl#<call id>` or a transcript path)."""
    sample: int = 0
    """Sample index when an ensemble draws several verdicts per candidate."""


class SelectedColumn(BaseModel):
    """One chosen candidate: becomes one column of the subspace at `layer`."""

    candidate: str
    layer: int
    label: str | None = None
    relation: Relation | None = None
    confidence: float | None = None
    verdict_ref: str | None = None


class Selection(BaseModel):
    """The candidates chosen for ablation and how."""

    policy: dict[str, Any] = Field(default_factory=dict)
    """The selection policy and its parameters (threshold, limits, ensemble, baseline)."""
    selected: list[SelectedColumn] = Field(default_factory=list)
    considered: int = 0
    """How many candidates had verdicts."""
    notes: str = ""
    dropped: list[str] = Field(default_factory=list)
    """Candidates that qualified but were left out by the per-layer or total limits."""
    unscored: list[str] = Field(default_factory=list)
    """Candidates with no scored verdict (parse failures, provider errors)."""
    directions: str | None = None
    """Path of the directions file the columns come from (used by `caft triage apply`)."""
    model: str | None = None
    """The model id the directions belong to (recorded in the subspace)."""
    calibration: dict[str, Any] | None = None
    """LLM judges with random controls: the threshold set from the controls' scores (`alpha`, the calibrated
    and the policy threshold, the one used, the controls' false-positive rate at it, their scores)."""
