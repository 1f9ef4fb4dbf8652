"""Training configs: one `TrainConfig` with small sections (data, lora, optim, ablation), plus presets.

Presets are plain dicts of field values laid under a user's config (`--preset em`): the user's file and
`--set` overrides win. `em` is the paper's emergent-misalignment recipe, `spurious` its spurious-correlation
recipe (see ANCHORS section 1).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from caft.config import CaftConfig, ModelConfig, apply_overrides, read_yaml, validate_config
from caft.errors import ConfigError

Objective = Literal["chat", "choice_lm", "encoder_classifier"]
AblationMode = Literal["project", "mean", "detached", "gradient", "steer", "penalty"]
"""What happens at the subspace's layers (caft.training.ablation.MODES is derived from this)."""


class DataConfig(CaftConfig):
    """Where the examples come from and how they become tokens."""

    path: str | None = None
    """Training JSONL. `chat`: OpenAI fine-tuning rows {"messages": [...]}; `choice_lm` and
    `encoder_classifier`: {"text", "label"} or {"prompt", "options", "label"} rows."""
    eval_path: str | None = None
    """Held-out JSONL in the same format; when absent, `eval_fraction` of the training rows are held out."""
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of training rows held out for the periodic eval loss when `eval_path` is not given."""
    skip_invalid: bool = False
    """Skip malformed rows (reported with their line numbers and a count) instead of stopping at the first."""
    max_length: int | None = Field(default=None, gt=0)
    """Maximum tokens per example; default: the model config's `chat.max_length`."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with longer examples: cut them at `max_length`, or drop them (counts are reported)."""
    label_names: list[str] | None = None
    """Class names in label-index order (classification). Default: the sorted distinct labels of the data
    (string labels) or `0..n-1` (integer labels)."""


class LoraSettings(CaftConfig):
    """LoRA adapter shape (peft)."""

    r: int = Field(default=32, gt=0)
    """Adapter rank."""
    alpha: int = Field(default=64, gt=0)
    """Scaling numerator: the update is scaled by alpha/r (or alpha/sqrt(r) with rsLoRA)."""
    rslora: bool = True
    """Rank-stabilized LoRA scaling alpha/sqrt(r)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get adapters (peft `target_modules`); `all-linear` is accepted as one entry."""


class OptimConfig(CaftConfig):
    """AdamW, schedule, batch shape and precision."""

    lr: float = Field(default=1e-5, gt=0)
    """Peak learning rate."""
    head_lr: float | None = Field(default=None, gt=0)
    """Learning rate of a classification head (encoder_classifier); default: `lr`."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    batch_size: int = Field(default=2, gt=0)
    """Examples per micro-batch."""
    grad_accum: int = Field(default=8, gt=0)
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training data (fractions allowed); `max_steps` caps it."""
    max_steps: int | None = Field(default=None, gt=0)
    """Stop after this many optimizer steps (the schedule is laid out over this many)."""
    warmup_steps: int | None = Field(default=None, ge=0)
    """Linear warmup length in optimizer steps."""
    warmup_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    """Linear warmup as a fraction of all steps (used when `warmup_steps` is not set)."""
    schedule: Literal["linear", "constant"] = "linear"
    """After warmup: linear decay to zero, or constant."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm (None: no clipping)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16` runs the forward under bfloat16 autocast (weights and optimizer state stay as loaded)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of storing them (transformers models): less
    memory for long sequences and large models, about a third more compute. The ablation hook sits on each
    layer's output, outside the recomputed region, so the gradients are those of a run without it."""

    @model_validator(mode="after")
    def _one_warmup(self) -> OptimConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self


class AblationConfig(CaftConfig):
    """Which directions to ablate during training, and how. No subspace: plain fine-tuning."""

    subspace: str | None = None
    """Subspace directory (subspace.safetensors + subspace.json). None and no `random`: no ablation."""
    random: str | None = None
    """Random-directions baseline instead of a subspace: `LAYER:K,...` (e.g. `12:20,32:20`)."""
    random_seed: int = 0
    """Seed of the random subspace."""
    mode: AblationMode = "project"
    """project (CAFT), mean, detached (activations only), gradient (gradients only), steer (h + c v),
    penalty (no edit: a soft one-sided loss term on the subspace's coordinates, caft.training.penalty)."""
    steer_coef: float | None = None
    """Signed coefficient c of `steer` (h + c v); required with that mode (e.g. 4 or -4: which sign helps
    depends on the model)."""
    steer_vectors: str | None = None
    """Safetensors file of steering vectors (`layer.<L>`: (d,)); default: each layer's mean projection of the
    subspace over the training data, mu Q^T (computed like the means of `mean`)."""
    mean_batches: int = Field(default=16, gt=0)
    """Training batches used to compute the reference means of `mean` (with the base model, no ablation)
    and the reference magnitudes of `penalty`."""
    penalty_coef: float | None = Field(default=None, ge=0.0)
    """Weight of the soft one-sided penalty of mode `penalty` (caft.training.penalty); required there."""
    penalty_quantile: float | None = Field(default=None, gt=0.0, le=1.0)
    """Mode `penalty`: each direction's reference magnitude is this quantile of |hQ| under the base model
    (None: 0.99)."""

    @model_validator(mode="after")
    def _one_source(self) -> AblationConfig:
        if self.subspace is not None and self.random is not None:
            raise ValueError("set ablation.subspace or ablation.random, not both")
        if self.mode == "penalty" and self.penalty_coef is None:
            raise ValueError("ablation.mode penalty needs ablation.penalty_coef (its weight, e.g. 1)")
        if self.mode == "steer" and self.steer_coef is None:
            raise ValueError(
                "ablation.mode steer needs a signed ablation.steer_coef (--steer-coef), e.g. 4 or -4: "
                "which sign helps depends on the model"
            )
        return self

    @property
    def active(self) -> bool:
        return self.subspace is not None or self.random is not None


class TrainConfig(CaftConfig):
    """Fine-tuning, plain or with concept ablation."""

    model: ModelConfig | None = None
    """The model to fine-tune; in a run config, leave it out to use the run's `model`."""
    objective: Objective = "chat"
    """`chat`: next-token loss on assistant tokens; `choice_lm`: cross-entropy over the option letters at
    the last prompt position (causal LM); `encoder_classifier`: mean-pooled encoder + linear head."""
    method: Literal["lora", "full"] = "lora"
    """LoRA adapters (peft) or full fine-tuning."""
    freeze_embeddings: bool = False
    """Keep the input embeddings fixed (full fine-tuning and encoder_classifier)."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training data."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    """LoRA settings (method: lora)."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    ablation: AblationConfig = Field(default_factory=AblationConfig)
    """Concept ablation during training."""
    seed: int = 0
    """Seed for initialization, data order and dropout."""
    eval_every: int = Field(default=0, ge=0)
    """Held-out eval loss every N optimizer steps (0: only at the end, when there is a held-out split)."""
    eval_batches: int | None = Field(default=None, gt=0)
    """Cap on held-out micro-batches per evaluation (None: all)."""
    log_every: int = Field(default=1, gt=0)
    """Write a training-log record every N optimizer steps."""
    save_every: int = Field(default=0, ge=0)
    """Checkpoint every N optimizer steps (0: only the final output)."""
    keep_checkpoints: int = Field(default=2, gt=0)
    """How many recent checkpoints to keep on disk."""
    progress: bool = True
    """Show a progress bar (loss, lr, tokens/s)."""


PRESETS: dict[str, dict[str, Any]] = {
    # Emergent misalignment (insecure code): LoRA r=32, alpha=64, rsLoRA, lr 1e-5, 1 epoch, 2 x 8, warmup 5.
    "em": {
        "objective": "chat",
        "method": "lora",
        "lora": {
            "r": 32,
            "alpha": 64,
            "rslora": True,
            "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        "optim": {
            "lr": 1e-5,
            "weight_decay": 0.01,
            "batch_size": 2,
            "grad_accum": 8,
            "epochs": 1,
            "warmup_steps": 5,
            "schedule": "linear",
        },
        # max_seq_len 2048: the model config's chat.max_length default
    },
    # Spurious correlation (multiple choice): full FT, AdamW lr 5e-6, betas (0.9, 0.95), warmup ratio 0.5,
    # batch 16, loss over the answer letters at the last position.
    "spurious": {
        "objective": "choice_lm",
        "method": "full",
        "optim": {
            "lr": 5e-6,
            "betas": [0.9, 0.95],
            "weight_decay": 0.01,
            "warmup_ratio": 0.5,
            "batch_size": 16,
            "grad_accum": 1,
            "epochs": 4,
            "schedule": "linear",
        },
    },
    # Encoder + linear head (the MiniLM spurious-correlation demo): all blocks trained, embeddings frozen.
    "encoder": {
        "objective": "encoder_classifier",
        "method": "full",
        "freeze_embeddings": True,
        "optim": {
            "lr": 3e-5,
            "head_lr": 1e-3,
            "weight_decay": 0.01,
            "batch_size": 32,
            "grad_accum": 1,
            "epochs": 2,
            "warmup_steps": 0,
            "schedule": "linear",
        },
    },
}


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset(name: str) -> dict[str, Any]:
    """The field values of a preset (a copy)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return _merge({}, PRESETS[name])


def build_train_config(
    preset_name: str | None = None,
    file: str | None = None,
    values: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """Layer preset < YAML file < explicit values < `a.b=c` overrides, then validate.

    A YAML file may hold the training section at top level or under `train:` (a whole run config); a
    `model:` at top level of a run config is used when the train section has none.
    """
    data: dict[str, Any] = preset(preset_name) if preset_name else {}
    source = f"preset {preset_name}" if preset_name else "<defaults>"
    if file is not None:
        raw = read_yaml(file)
        train_section = raw.get("train")
        section: dict[str, Any] = dict(train_section) if isinstance(train_section, dict) else raw
        if isinstance(train_section, dict) and "model" in raw and "model" not in section:
            section["model"] = raw["model"]
        data = _merge(data, section)
        source = file
    if values:
        data = _merge(data, values)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " with overrides " + " ".join(overrides)
    return validate_config(TrainConfig, data, source)
