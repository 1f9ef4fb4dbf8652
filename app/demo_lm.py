"""The demo on a causal LM: `caft demo --model gemma-3-270m --task sentiment-topic [--form double]`.

The same run as the MiniLM demo (caft.app.demo), with the choices a causal LM needs:

    spurious/  the seed's spurious data (caft.app.spurious), as for the encoder
    data/      its multiple-choice form (caft.app.spurious_choice): what the model trains and is scored on
    run/       one `caft run`: train (`choice_lm`: the answer letter at the last prompt position; full
               fine-tune, embeddings frozen, lr 2e-5, batch 16, `steps` optimizer steps), diff (PCs of
               ft - base on the training prompts at every third layer), controls + evidence on the corpus,
               triage (offline embedding judge), caft, baselines (random, top-k), eval (ID / OOD letter
               accuracy, test-time baseline), report

Every ablation of the run (caft, the random and top-k baselines, the test-time baseline) uses one mode,
`mean` by default: on Gemma-3 zero-projection of even 8 random directions costs 4-10 nats of loss before
training starts (docs/gemma.md), so a `project` random baseline would measure the damage, not a control.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.config import ModelConfig

if TYPE_CHECKING:
    from caft.app.demo import DemoConfig
    from caft.app.run_config import RunConfig

log = logging.getLogger(__name__)

SPURIOUS_DIR = "spurious"
DATA_DIR = "data"
LM_SIZES = {"train": 960, "val": 200, "ood": 200, "corpus": 600}
LM_LR = 2e-5
LM_BATCH = 16
LM_MODE = "mean"
LM_DIFF_EXAMPLES = 320
"""Training prompts the diff runs both models on (PCA converges well before all 960)."""


def lm_model(cfg: DemoConfig) -> ModelConfig:
    assert cfg.model is not None
    return ModelConfig(name_or_path=cfg.model, kind="causal_lm")


def lm_layers(n_layers: int) -> list[int]:
    """Every third layer from the third, the last one left out (its output only feeds the unembedding)."""
    return list(range(2, n_layers - 1, 3))


def lm_sizes(cfg: DemoConfig) -> dict[str, int]:
    return {**LM_SIZES, **(cfg.sizes or {})}


def write_lm_data(cfg: DemoConfig, seed_dir: Path, seed: int) -> None:
    """The seed's spurious data (or the user's folder, `--data`), then its multiple-choice form in `data/`."""
    from caft.app.spurious import dataset_files, write_spurious
    from caft.app.spurious_choice import write_choice

    if cfg.data is not None:
        dataset_files(cfg.data)  # checked: meta.json and every file present
        src = Path(cfg.data)
    else:
        src = seed_dir / SPURIOUS_DIR
        write_spurious(cfg.task, src, seed=seed, sizes=lm_sizes(cfg))
    write_choice(src, seed_dir / DATA_DIR, form=cfg.form, seed=seed)


def lm_train_values(cfg: DemoConfig, train_path: str, seed: int) -> dict[str, Any]:
    """The fine-tune of every model of the run (plain, caft, baselines): the `spurious` preset with the
    learning rate, batch and length that show the gap on Gemma-3-270M in ~15-20 steps."""
    return {
        "objective": "choice_lm",
        "method": "full",
        "freeze_embeddings": True,
        "data": {"path": train_path, "max_length": 256},
        "optim": {
            "lr": LM_LR,
            "batch_size": LM_BATCH,
            "grad_accum": 1,
            "epochs": 1,
            "max_steps": cfg.steps,
            "warmup_ratio": 0.1,
        },
        "ablation": {"mode": cfg.ablation_mode or LM_MODE},
        "seed": seed,
        "progress": False,
    }


def causal_run_config(cfg: DemoConfig, seed_dir: str | Path, seed: int) -> RunConfig:
    """The `caft run` config of one seed on a causal LM (see the module docstring)."""
    from caft.app.demo import EVAL_BATCH, RUN_DIR
    from caft.app.demo_judge import demo_triage
    from caft.app.run_config import BaselinesConfig, ClassificationEvalConfig, RunConfig
    from caft.app.stages import model_n_layers
    from caft.interp.config import ContrastConfig, DiffConfig, EvidenceConfig, InputsConfig, SteeringConfig
    from caft.training.config import build_train_config

    root = Path(seed_dir)
    data = root / DATA_DIR
    model = lm_model(cfg)
    train_path = str(data / "train.jsonl")
    want = set(cfg.conditions)
    if "oracle" in want:
        log.warning("the oracle probe reference is built for the encoder demo only; skipped on a causal LM")
    layers = cfg.layers if cfg.layers is not None else lm_layers(model_n_layers(model))
    batch = min(EVAL_BATCH, LM_BATCH)
    return RunConfig(
        name=f"demo-{cfg.task}-{cfg.form}-seed{seed}",
        out_dir=str(root / RUN_DIR),
        seed=seed,
        task_kind="classification",
        model=model,
        task=str(data / "task.yaml"),
        train=build_train_config("spurious", values=lm_train_values(cfg, train_path, seed)),
        diff=DiffConfig(
            layers=layers,
            inputs=InputsConfig(
                data=[train_path], tokens="all", text_field="prompt", max_examples=LM_DIFF_EXAMPLES
            ),
            n_components=cfg.n_components,
            include_mean=False,
            batch_size=batch,
        ),
        evidence=EvidenceConfig(
            corpus=str(data / "corpus.jsonl"),
            top_k=cfg.top_k_windows,
            diff_summary=False,
            logit_lens=False,
            steering=SteeringConfig(enabled=False),
            contrast=ContrastConfig(basis=cfg.contrast_basis),
            batch_size=batch,
        ),
        triage=demo_triage(cfg),
        baselines=BaselinesConfig(random="random" in want, topk="topk" in want),
        eval_models=["ft", "caft"],
        classification=ClassificationEvalConfig(
            val=str(data / "val.jsonl"),
            ood=str(data / "ood.jsonl"),
            test_time_baseline="test_time" in want,
            batch_size=batch,
        ),
    )
