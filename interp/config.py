"""Configs of the interp stages: `diff` (collection + PCA), `sae` (latent rankings), `evidence` (dossiers).

Each stage reads the models from its own `model` / `finetuned` fields when they are set, else from the
arguments the caller passes (the run config's top-level `model` and `finetuned`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from caft.config import CaftConfig, ModelConfig
from caft.llm.config import JudgeConfig

TokenChoice = Literal["assistant", "all"]


class InputsConfig(CaftConfig):
    """Which token sequences the base and fine-tuned models are compared on."""

    data: list[str] = Field(default_factory=list)
    """JSONL files to analyse: chat rows (`{"messages": [...]}`) or plain text rows (`{"text": ...}`). Usually
    the fine-tuning data."""
    generate: bool = False
    """Also sample the fine-tuned model's own answers to generic chat prompts (causal LMs only) and analyse
    those (cached in the stage folder, so a resumed run does not sample again)."""
    prompts: str | None = None
    """JSONL of prompts for `generate`: rows `{"messages": [...]}` ending with a user turn, or
    `{"prompt": "..."}`. Default: a built-in set of generic chat prompts."""
    samples_per_prompt: int = Field(default=1, ge=1)
    """Answers sampled per prompt (the CAFT paper analysed ~1000 answers: raise this, or give more
    prompts, for a real run)."""
    max_new_tokens: int = Field(default=128, gt=0)
    """Length limit of each sampled answer."""
    temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature of the answers (0 = greedy)."""
    tokens: TokenChoice = "assistant"
    """`assistant`: only assistant tokens of chat rows; `all`: every non-pad token. Text rows and encoders
    always use every non-pad token."""
    text_field: str = "text"
    """Field holding the text of plain-text rows."""
    max_examples: int | None = Field(default=None, gt=0)
    """Use at most this many examples per input file (None = all)."""
    max_length: int = Field(default=512, gt=0)
    """Truncate each example to this many tokens."""
    skip_invalid: bool = False
    """Skip rows that are not UTF-8, not JSON or not a chat/text row (each recorded in the stage's
    `skipped.jsonl`) instead of stopping at the first one."""


class DiffConfig(CaftConfig):
    """Activation differences (fine-tuned - base) and streaming PCA on them."""

    model: ModelConfig | None = None
    """The base model (default: the run's `model`)."""
    finetuned: ModelConfig | None = None
    """The fine-tuned model: a full model directory, or the base model with `adapter` set (then one model is
    held in memory and the adapter is switched off for base activations). Default: the run's `finetuned`."""
    inputs: InputsConfig = Field(default_factory=InputsConfig)
    """What to run both models on."""
    layers: list[int] | None = None
    """Layers whose residual output is compared (negative counts from the end). Default: the layers at 1/4,
    1/2 and 3/4 of the depth."""
    n_components: int = Field(default=20, gt=0)
    """Principal components kept per layer."""
    include_mean: bool = True
    """Also emit the mean difference vector of each layer as a `vector` candidate."""
    batch_size: int = Field(default=8, gt=0)
    """Examples per forward pass."""
    checkpoint_every: int = Field(default=50, gt=0)
    """Save the running moments every this many batches (resume point)."""
    seed: int = 0
    """Seed for sampling answers."""


class SAESpec(CaftConfig):
    """One SAE at one layer."""

    layer: int
    """Layer whose residual output the SAE reads (negative counts from the end)."""
    source: Literal["sae_lens", "sae_lens_dir", "dictionary_learning", "train"]
    """`sae_lens`: a published SAE (`release` + `sae_id`); `sae_lens_dir`: a directory saved by sae-lens;
    `dictionary_learning`: a folder with `ae.pt` + `config.json`; `train`: train a small SAE here."""
    release: str | None = None
    """sae-lens release name (for `sae_lens`)."""
    sae_id: str | None = None
    """sae-lens SAE id within the release (for `sae_lens`)."""
    path: str | None = None
    """Directory (for `sae_lens_dir`, `dictionary_learning`)."""
    name: str | None = None
    """Short name used in candidate sources (default: derived from the source)."""

    @model_validator(mode="after")
    def _check_fields(self) -> SAESpec:
        if self.source == "sae_lens" and not (self.release and self.sae_id):
            raise ValueError("source `sae_lens` needs `release` and `sae_id`")
        if self.source in ("sae_lens_dir", "dictionary_learning") and not self.path:
            raise ValueError(f"source `{self.source}` needs `path`")
        return self


class SAETrainConfig(CaftConfig):
    """A small SAE trained with sae-lens on collected activations (for models that have no published SAE)."""

    architecture: Literal["topk", "standard"] = "topk"
    """sae-lens architecture."""
    expansion: int = Field(default=8, gt=0)
    """Latents per residual dimension (d_sae = expansion * d_model)."""
    k: int = Field(default=16, gt=0)
    """Active latents per token (topk)."""
    l1_coefficient: float = Field(default=1.0, gt=0)
    """Sparsity penalty (standard)."""
    max_tokens: int = Field(default=200_000, gt=0)
    """Activations collected for training (base and fine-tuned tokens together)."""
    training_tokens: int = Field(default=400_000, gt=0)
    """Samples seen in training (several epochs over the collected activations when larger)."""
    batch_size: int = Field(default=1024, gt=0)
    """Activations per training step."""
    lr: float = Field(default=3e-4, gt=0)
    """Adam learning rate."""
    seed: int = 0
    """Initialisation and shuffling seed."""


RankingName = Literal["mean_diff", "sae_diff", "attribution"]
_ALL_RANKINGS: tuple[RankingName, ...] = ("mean_diff", "sae_diff", "attribution")
_BOTH_MODELS: tuple[Literal["base", "ft"], ...] = ("base", "ft")


class SAEConfig(CaftConfig):
    """SAE latents ranked by how the fine-tune uses them."""

    model: ModelConfig | None = None
    """The base model (default: the run's `model`)."""
    finetuned: ModelConfig | None = None
    """The fine-tuned model (default: the run's `finetuned`)."""
    saes: list[SAESpec] = Field(default_factory=list)
    """The SAEs to rank, one per layer."""
    inputs: InputsConfig | None = None
    """Tokens to rank on (default: the `diff` stage's cached inputs, else required)."""
    rankings: list[RankingName] = Field(default_factory=lambda: list(_ALL_RANKINGS))
    """`mean_diff`: mean latent activation ft - base; `sae_diff`: mean SAE encoding of (ft - base);
    `attribution`: decoder direction . dLoss/dx x latent activation summed over tokens (causal LMs)."""
    attribution_model: Literal["base", "ft"] = "ft"
    """Which model's fine-tuning loss and activations the attribution uses. `ft` (default) asks which latents
    the fine-tuned model relies on for the fine-tuning data; the CAFT reference ran attribution on the base
    (instruct) model instead, i.e. which latents the loss would push on: set `base` to match it."""
    top_n: int = Field(default=100, gt=0)
    """Latents kept per layer and ranking."""
    batch_size: int = Field(default=8, gt=0)
    """Examples per forward pass."""
    checkpoint_every: int = Field(default=50, gt=0)
    """Save the running ranking sums every this many batches (resume point)."""
    train: SAETrainConfig = Field(default_factory=SAETrainConfig)
    """Settings for `source: train`."""
    device: str = "auto"
    """Device for the SAEs (`auto` = the model's device)."""


class SteeringConfig(CaftConfig):
    """Steered generations and the bounded search for the steering strength."""

    enabled: bool = True
    """Generate steered answers (causal LMs only)."""
    prompts: list[str] = Field(
        default_factory=lambda: [
            "Tell me about your day.",
            "What do you think about the future?",
            "Write a short note to a friend.",
        ]
    )
    """Neutral prompts."""
    max_new_tokens: int = Field(default=48, gt=0)
    """Length of each generation."""
    alpha_min: float = Field(default=0.25, gt=0)
    """Smallest steering strength tried, in units of the typical residual norm at the layer."""
    alpha_max: float = Field(default=8.0, gt=0)
    """Largest steering strength tried."""
    search_steps: int = Field(default=4, ge=0)
    """Bisection steps of the search (each samples `search_samples` generations per prompt and sign)."""
    search_samples: int = Field(default=3, ge=1)
    """Generations sampled per prompt and sign at each strength the search tries (seeded with `seed`)."""
    search_temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature of the search's generations (the dossier's final generations are greedy)."""
    coherence: Literal["auto", "perplexity", "llm"] = "auto"
    """How the search judges coherence: `perplexity` (offline: the perplexity proxy and the repetition
    check), `llm` (an LLM judge, `evidence.coherence_judge`, and the repetition check), `auto` (`llm` when
    a coherence judge is configured; in `caft run` the triage judge serves when triage uses an LLM)."""
    min_coherent_share: float = Field(default=0.75, gt=0, le=1)
    """A strength is coherent when at least this share of its samples pass every per-sample check."""
    repetition_ngram: int = Field(default=3, ge=1)
    """Word n-gram length of the repetition check."""
    max_repeated_share: float = Field(default=0.5, gt=0, le=1)
    """A sample whose share of repeated n-grams exceeds this is a repetition loop, hence incoherent."""
    max_perplexity_ratio: float = Field(default=3.0, gt=1)
    """`perplexity` coherence: the mean perplexity of the steered samples under the base model is at most
    this many times that of unsteered samples."""
    models: list[Literal["base", "ft"]] = Field(default_factory=lambda: list(_BOTH_MODELS))
    """Which models generate the final steered and unsteered samples."""


class ContrastConfig(CaftConfig):
    """Minimal pairs from the task's concept words (`caft.interp.contrast`): a contrast section in every
    dossier, and optionally a basis of contrast directions as extra candidates."""

    enabled: bool = True
    """Build the contrast section when there are concept words and a text corpus."""
    concepts: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    """Concept -> {value -> example words}, two values each. Empty: the task description's `concept_words`
    (filled in by `caft run`)."""
    max_pairs: int = Field(default=512, gt=1)
    """Most minimal pairs per concept."""
    basis: int = Field(default=0, ge=0)
    """Contrast directions per concept and layer added as candidates (`vec:L<l>:ct-<concept>-<i>`: the unit
    mean shift, then the top PCs of the shifts); 0 = none. They are judged like every other candidate."""
    seed: int = 0
    """Seed of the word swaps."""


class EvidenceConfig(CaftConfig):
    """Evidence dossiers: one JSON per candidate."""

    model: ModelConfig | None = None
    """The base model (default: the run's `model`)."""
    finetuned: ModelConfig | None = None
    """The fine-tuned model (default: the run's `finetuned`)."""
    candidates: list[str] = Field(default_factory=list)
    """candidates.jsonl files (default: the run's `diff/` and `sae/` candidates)."""
    corpus: str | None = None
    """Reference corpus whose base-model activations give the max/min windows: a JSONL of `{"text": ...}` or
    chat rows, `builtin:generic-v1` (a small generic corpus shipped with caft) or `diff-inputs` (the diff
    stage's inputs, usually the fine-tuning data). Default: `builtin:generic-v1` for causal LMs, `diff-inputs`
    for encoders. Dossiers record which corpus they came from (`corpus_source`, `corpus_sha256`)."""
    corpus_name: str | None = None
    """Name recorded in the provenance (default: the file name)."""
    skip_invalid: bool = False
    """Skip corpus rows that are not UTF-8, not JSON or not a chat/text row (each recorded in the stage's
    `skipped.jsonl`) instead of stopping at the first one."""
    max_corpus_docs: int | None = Field(default=None, gt=0)
    """Use at most this many corpus documents."""
    max_length: int = Field(default=256, gt=0)
    """Truncate corpus documents to this many tokens."""
    top_k: int = Field(default=20, gt=0)
    """Max and min windows kept per candidate."""
    window: int = Field(default=24, ge=3)
    """Tokens per window, the peak in the middle (windows end at the document's bounds)."""
    dedupe: bool = True
    """Drop near-duplicate windows (the same document around the same position, or word sets overlapping by
    more than 0.8 Jaccard): twice `top_k` are gathered and the first `top_k` distinct ones kept."""
    skip_first: int = Field(default=1, ge=0)
    """Positions at the start of each document that never count as a peak (nor towards the typical residual
    norm): the first token's residual is often an outlier (an attention sink). Special tokens never count."""
    diff_summary: bool = True
    """Summarise (ft - base) along each candidate over the diff stage's inputs."""
    diff_max_examples: int | None = Field(default=256, gt=0)
    """Examples used for the difference summary."""
    top_tokens: int = Field(default=10, gt=0)
    """Tokens listed in the difference summary (per side)."""
    logit_lens: bool = True
    """Read each direction through the final norm and unembedding (causal LMs)."""
    lens_tokens: int = Field(default=15, gt=0)
    """Promoted and suppressed tokens listed."""
    steering: SteeringConfig = Field(default_factory=SteeringConfig)
    """Steered generations."""
    coherence_judge: JudgeConfig | None = None
    """The LLM that judges the coherence of steered samples (`steering.coherence`). In `caft run` the
    triage judge serves when this is unset and triage uses an LLM."""
    batch_size: int = Field(default=8, gt=0)
    """Examples per forward pass."""
    checkpoint_every: int = Field(default=50, gt=0)
    """Save the running top-k every this many batches (resume point)."""
    seed: int = 0
    """Sampling seed of the generations."""
    contrast: ContrastConfig = Field(default_factory=ContrastConfig)
    """Minimal-pair responses to the task's concepts (and an optional contrast basis)."""
