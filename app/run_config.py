"""The run config: one YAML file describing a whole CAFT run (`caft run config.yaml`).

Each stage's section is that stage's own config class; this module only composes them and fills the
cross-stage defaults (the base model, the training data as diff inputs, the task description for the judge).
It imports only config modules (pydantic), so `caft config validate` stays fast.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from caft.agent.config import TriageConfig
from caft.config import CaftConfig, ModelConfig
from caft.evals.config import EvalConfig
from caft.interp.config import DiffConfig, EvidenceConfig, SAEConfig
from caft.training.config import TrainConfig

TaskKind = Literal["chat", "classification"]
ModelRole = Literal["base", "ft", "caft"]
_DEFAULT_EVAL_MODELS: tuple[ModelRole, ...] = ("base", "ft", "caft")
_MOVED = {
    "triage_judge": "triage.kind (single | agent | offline-embedding)",
    "offline_judge": "triage.offline",
    "controls_per_layer": "triage.controls_per_layer",
}


class ClassificationEvalConfig(CaftConfig):
    """Accuracy of a classification / multiple-choice task, in distribution and out of distribution."""

    val: str | None = None
    """In-distribution test set (JSONL rows in the training format)."""
    ood: str | None = None
    """Out-of-distribution test set (the spurious cue inverted)."""
    test_time_baseline: bool = True
    """Also evaluate the fine-tuned model with the selected subspace ablated at test time only (the paper's
    baseline)."""
    batch_size: int = Field(default=32, gt=0)
    """Examples per forward pass."""


class BaselinesConfig(CaftConfig):
    """Control fine-tunes, each one switch, trained after the `caft` stage and evaluated beside it (the
    report lists which ran). The subspace baselines ablate another subspace with the same number of
    directions per layer as the triage selection (same training config, ablation mode and seed as the `caft`
    stage); the steering and penalty baselines use the triage subspace with another mode; the fewer-steps
    baseline is the plain fine-tune at intermediate checkpoints; the test-time-only baseline ablates at
    sampling only."""

    random: bool = False
    """A random orthonormal subspace, seeded with the run seed."""
    topk: bool = False
    """The top principal components of the diff stage by explained variance."""
    steer: list[float] = Field(default_factory=list)
    """Preventative steering (persona-vectors style): one fine-tune per signed coefficient c, adding c times
    the mean projection of the triage subspace over the training data at its layers (ablation mode `steer`).
    Row names: `steer+4`, `steer-4`."""
    penalty: list[float] = Field(default_factory=list)
    """The soft one-sided penalty (ablation mode `penalty`, caft.training.penalty): one fine-tune per
    coefficient, the sweep that draws the trade-off curve. Row names: `penalty1`, `penalty10`."""
    penalty_quantile: float = Field(default=0.99, gt=0.0, le=1.0)
    """The penalty's reference magnitude per direction: this quantile of |hQ| under the base model."""
    steps: int = Field(default=0, ge=0)
    """Fewer steps / early stopping: evaluate about this many intermediate checkpoints of the plain
    fine-tune (a copy trained with the train stage's config, checkpointed every ceil(total / (steps + 1))
    steps). Row names: `steps@N` (N = the step)."""

    test_time: bool = False
    """Test-time-only ablation, chat runs: the plain fine-tune sampled with the triage subspace projected out
    of every forward (row `test_time`; nothing is trained). Classification runs:
    `classification.test_time_baseline`."""

    @model_validator(mode="after")
    def _distinct(self) -> BaselinesConfig:
        for name in ("steer", "penalty"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"baselines.{name} lists a coefficient twice: {values}")
        if any(c < 0 for c in self.penalty):
            raise ValueError(f"baselines.penalty coefficients must be >= 0, got {self.penalty}")
        return self

    @property
    def enabled(self) -> list[str]:
        """Names of the baselines this config trains, in order (the steps sweep is one name, `steps`)."""
        names = [name for name in ("random", "topk") if getattr(self, name)]
        names += [steer_name(c) for c in self.steer]
        names += [penalty_name(c) for c in self.penalty]
        return names + (["steps"] if self.steps else [])


def steer_name(coef: float) -> str:
    return f"steer{coef:+g}"


def penalty_name(coef: float) -> str:
    return f"penalty{coef:g}"


class LaunchConfig(CaftConfig):
    """How the run's fine-tunes use this machine's devices (`caft.training.launch`); the other stages run once,
    in the `caft run` process. Not part of any stage's fingerprint: the same run resumes with any count."""

    processes: int = Field(default=1, ge=1)
    """Ranks per fine-tune (train, caft, the loop's rounds, the baselines): > 1 starts each as a torchrun job
    on this machine, one rank per GPU (gloo ranks on CPU), and waits for it. 1: in this process."""
    fsdp: bool = False
    """With `processes` > 1: shard the model (FSDP2) instead of replicating it (DDP), for models that do
    not fit one device."""


class CaftStageConfig(CaftConfig):
    """The `caft` stage: the fine-tune with the triage subspace ablated, and its optional closed loop."""

    loop_rounds: int = Field(default=0, ge=0)
    """After the CAFT fine-tune, rounds of: diff the CAFT model against the base on the training inputs,
    evidence, judge, add the undesired directions to the subspace, fine-tune again (`caft.app.loop`). Stops
    early when a round adds nothing. 0 = no loop."""
    loop_components: int | None = Field(default=None, gt=0)
    """PCs per layer in each round (None: `diff.n_components`)."""


class RunConfig(CaftConfig):
    """A whole caft run: baseline fine-tune -> diff (+ SAE) -> evidence -> triage -> CAFT (+ baselines) -> eval ->
    report."""

    name: str = "caft-run"
    """Run name (used in reports)."""
    out_dir: str = "runs/caft-run"
    """Run directory: manifest, one folder per stage, completion markers."""
    seed: int = 0
    """Global seed: the training seed, unless `train.seed` is set explicitly."""
    task_kind: TaskKind = "chat"
    """`chat`: SFT on chat JSONL, evaluated for misalignment (and code vulnerability when `eval.code_prompts`
    is set); `classification`: text/label JSONL, evaluated for ID and OOD accuracy."""
    model: ModelConfig
    """The base model."""
    finetuned: ModelConfig | None = None
    """An already fine-tuned model or adapter; when absent, the `train` stage fine-tunes the base model."""
    task: str | None = None
    """Task description the judge reads (YAML path or a bundled name); default for `triage.task`."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Fine-tuning, shared by the baseline (`train`) and the CAFT stage (`caft`, with the triage subspace)."""
    diff: DiffConfig = Field(default_factory=DiffConfig)
    """Activation differences and PCA. Inputs default to the training data."""
    sae: SAEConfig | None = None
    """SAE latent rankings; the stage runs only when this section lists SAEs."""
    evidence: EvidenceConfig = Field(default_factory=EvidenceConfig)
    """Evidence dossiers for every candidate."""
    triage: TriageConfig = Field(default_factory=TriageConfig)
    """The judge (`triage.kind`: single, agent or offline-embedding), its random controls, verdicts and the
    selected subspace."""
    caft: CaftStageConfig = Field(default_factory=CaftStageConfig)
    """The CAFT fine-tune's closed loop (`caft.loop_rounds`)."""
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    """Multi-process fine-tunes (`launch.processes`, `launch.fsdp`; docs/scaling.md)."""
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    """Control fine-tunes (random subspace, top PCs) trained after the `caft` stage and evaluated with it."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Misalignment (and code) evaluation, for `task_kind: chat`."""
    eval_models: list[ModelRole] = Field(default_factory=lambda: list(_DEFAULT_EVAL_MODELS))
    """Which models the eval stage measures: `base` (the untouched base model, graded on the same prompts and
    samples: the reference row), `ft` (the plain fine-tune) and `caft`; the baselines that ran follow."""
    classification: ClassificationEvalConfig = Field(default_factory=ClassificationEvalConfig)
    """ID / OOD accuracy, for `task_kind: classification`."""

    @model_validator(mode="before")
    @classmethod
    def _moved_triage_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [f"{old} is now {new}" for old, new in _MOVED.items() if old in data]
            if moved:
                raise ValueError("; ".join(moved) + " (the judge's settings live in the triage section)")
        return data

    @model_validator(mode="after")
    def _check_kind(self) -> RunConfig:
        if self.task_kind == "classification" and self.train.objective == "chat":
            raise ValueError(
                "task_kind is classification but train.objective is chat: set train.objective to "
                "encoder_classifier or choice_lm"
            )
        if self.task_kind == "classification" and self.baselines.test_time:
            raise ValueError(
                "baselines.test_time samples a chat model; for task_kind classification set "
                "classification.test_time_baseline"
            )
        if self.task_kind == "chat" and self.train.objective != "chat":
            raise ValueError(
                f"task_kind is chat but train.objective is {self.train.objective}: set task_kind"
            )
        return self
