"""Configuration of the triage stage (`triage:` section of a run config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from caft.config import CaftConfig
from caft.llm.config import JudgeConfig


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
    require_chosen: bool = False
    """Agent mode: keep only candidates the agent named in its final `finish` call."""
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


class TriageConfig(CaftConfig):
    """The judge stage: dossiers + task description -> verdicts -> selection -> subspace."""

    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    """The judge model (`judge.model: openai/gpt-4.1`, `anthropic/...`, `openai-compatible/...` with
    `judge.base_url`), its concurrency, cache, retries and dollar limit."""
    mode: Literal["single", "agent"] = "single"
    """`single`: one verdict per candidate; `agent`: a tool-using session over all candidates."""
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
    prompts_dir: str | None = None
    """A folder whose `<name>.md` files replace bundled agent prompts of the same name."""
    prefilter: PrefilterConfig = Field(default_factory=PrefilterConfig)
    """Optional cheap pre-filter in front of the LLM judge."""
    render: RenderLimits = Field(default_factory=RenderLimits)
    """How much of each dossier the judge sees."""
    budget: AgentBudget = Field(default_factory=AgentBudget)
    """Agent-mode budgets."""
    selection: SelectionPolicy = Field(default_factory=SelectionPolicy)
    """Verdicts -> candidates to ablate."""
