"""The stage functions of `caft run`: each reads the earlier stages' folders through the run context and writes
its own. `caft.app.pipeline` decides which run and in what order."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.agent.config import OFFLINE_KIND
from caft.app.run_config import RunConfig
from caft.config import ModelConfig
from caft.errors import ConfigError, RunDirError
from caft.rundir import DIRECTIONS_FILE, FINAL_DIR, SUBSPACE_DIR, RunDir

if TYPE_CHECKING:
    from caft.llm.types import Provider
    from caft.subspace import Subspace

log = logging.getLogger(__name__)

STAGES = ("train", "diff", "sae", "evidence", "triage", "caft", "baselines", "eval", "report")


@dataclass
class RunContext:
    cfg: RunConfig
    run: RunDir
    judge_provider: Provider | None = None
    """Replaces the provider `triage.judge.model` names (tests and demos pass a mock)."""
    grade_client_factory: Any = None
    """Replaces the eval stage's judge client factory (tests pass a mock)."""

    @property
    def path(self) -> Path:
        return self.run.path

    def trained_model(self, stage: str) -> ModelConfig:
        """The model written by a training stage (`train` or `caft`): an adapter on the base, a full model, or
        a classifier folder."""
        final = self.path / stage / "final"
        if not final.is_dir():
            raise RunDirError(
                f"{final} does not exist: run the `{stage}` stage first (caft run --only {stage})"
            )
        base = self.cfg.model
        if (final / "adapter_config.json").is_file():
            return base.model_copy(update={"adapter": str(final)})
        return base.model_copy(update={"name_or_path": str(final), "adapter": None})

    def finetuned(self) -> ModelConfig:
        return self.cfg.finetuned if self.cfg.finetuned is not None else self.trained_model("train")

    def subspace_dir(self) -> Path:
        return self.path / "triage" / "subspace"


# ---- stages -------------------------------------------------------------------------------------------------


def _train_cfg(ctx: RunContext) -> Any:
    tc = ctx.cfg.train
    if "seed" not in tc.model_fields_set:
        tc = tc.model_copy(update={"seed": ctx.cfg.seed})
    return tc


def stage_train(ctx: RunContext) -> dict[str, Any]:
    from caft.training.trainer import train

    out = ctx.path / "train"
    res = train(_train_cfg(ctx), out, model=ctx.cfg.model, resume=True)
    return {"final": str(res.final_path), "metrics": res.metrics}


def stage_diff(ctx: RunContext) -> dict[str, Any]:
    from caft.interp.pca import run_diff

    cfg = ctx.cfg.diff
    inputs = cfg.inputs
    if not inputs.data and not inputs.generate:
        if ctx.cfg.train.data.path is None:
            raise ConfigError(
                "diff has no inputs: set diff.inputs.data, diff.inputs.generate, or train.data.path"
            )
        inputs = inputs.model_copy(update={"data": [ctx.cfg.train.data.path]})
    if ctx.cfg.task_kind == "classification" and "tokens" not in inputs.model_fields_set:
        inputs = inputs.model_copy(update={"tokens": "all"})
    cfg = cfg.model_copy(update={"inputs": inputs})
    folder = run_diff(cfg, ctx.path, model=ctx.cfg.model, finetuned=ctx.finetuned())
    return _marker_info(folder)


def stage_sae(ctx: RunContext) -> dict[str, Any]:
    from caft.interp.sae import run_sae_rank

    assert ctx.cfg.sae is not None
    folder = run_sae_rank(ctx.cfg.sae, ctx.path, model=ctx.cfg.model, finetuned=ctx.finetuned())
    return _marker_info(folder)


OFFLINE_JUDGE = OFFLINE_KIND
CONTROLS_DIR = "controls"
"""Under the triage folder: `triage/controls/` holds the random control candidates, and their evidence in
`triage/controls/evidence/` (built like the candidates' evidence, with the run's evidence config)."""


def uses_offline_judge(cfg: RunConfig) -> bool:
    return cfg.triage.kind == OFFLINE_JUDGE


def _candidate_dirs(ctx: RunContext) -> list[Path]:
    return ctx.run.layout.candidate_dirs()


def stage_evidence(ctx: RunContext) -> dict[str, Any]:
    from caft.interp.evidence import build_dossiers

    folder = build_dossiers(ctx.cfg.evidence, ctx.path, model=ctx.cfg.model, finetuned=ctx.finetuned())
    return _marker_info(folder)


def _build_controls(ctx: RunContext, n: int) -> Path:
    """`n` random directions per candidate layer, and their evidence; returns the controls' evidence folder.

    The evidence runs as its own small run rooted at `triage/controls/` (the evidence builder writes to
    `<root>/evidence` and reads the corpus and diff inputs from `<root>/diff`, a link to the run's diff stage)."""
    from caft.interp.evidence import build_dossiers
    from caft.interp.schema import load_candidate_set, write_random_candidates

    dirs = _candidate_dirs(ctx)
    if not dirs:
        raise RunDirError(f"no candidates in {ctx.path}: run the diff stage first (caft run --from diff)")
    cands, directions = load_candidate_set(dirs)
    d_model = int(next(iter(directions.values())).shape[0])
    root = ctx.path / "triage" / CONTROLS_DIR
    cand_dir = write_random_candidates(root, d_model, sorted({c.layer for c in cands}), n, ctx.cfg.seed)
    link = root / "diff"
    diff = ctx.run.layout.stage("diff")
    if diff.is_dir() and not link.is_symlink() and not link.exists():
        link.symlink_to(Path("..", "..", "diff"), target_is_directory=True)
    cfg = ctx.cfg.evidence.model_copy(update={"candidates": [str(cand_dir)]})
    return build_dossiers(cfg, root, model=ctx.cfg.model, finetuned=ctx.finetuned())


def _model_n_layers(ctx: RunContext) -> int | None:
    """The base model's layer count, recorded in the subspace (None when its config cannot be read)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(ctx.cfg.model.name_or_path)
    except (OSError, ValueError) as e:
        log.info(
            "subspace without n_layers: cannot read the config of %s (%s)", ctx.cfg.model.name_or_path, e
        )
        return None
    text = getattr(config, "text_config", None)
    for c in (config, text):
        n = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
        if isinstance(n, int):
            return n
    return None


def stage_triage(ctx: RunContext) -> dict[str, Any]:
    from caft.agent.judges import make_judge
    from caft.agent.triage import run_triage

    cfg = ctx.cfg.triage
    if cfg.task is None:
        if ctx.cfg.task is None:
            raise ConfigError(
                "the judge needs a task description: set `task` (or triage.task) in the run config"
            )
        cfg = cfg.model_copy(update={"task": ctx.cfg.task})
    judge = make_judge(cfg, provider=ctx.judge_provider)
    controls = _build_controls(ctx, judge.controls_per_layer) if judge.controls_per_layer > 0 else None
    res = run_triage(
        cfg,
        ctx.run.layout.stage("evidence"),
        ctx.path / "triage",
        controls_dir=controls,
        directions_path=[d / DIRECTIONS_FILE for d in _candidate_dirs(ctx)] or None,
        n_layers=_model_n_layers(ctx),
        judge=judge,
    )
    if not res.complete:
        raise RunDirError(
            "triage stopped before judging every candidate (a budget was reached); its verdicts are kept. "
            "Raise the budget and rerun `caft run` to continue, or review and apply the partial selection"
        )
    return {
        "selected": [c.candidate for c in res.selection.selected],
        "labels": {c.candidate: c.label for c in res.selection.selected},
        "subspace_dims": res.subspace.total_dims if res.subspace is not None else 0,
        "judge": res.summary["judge"],
        **{k: v for k, v in res.summary.items() if k in ("judged", "unscored", "usage", "controls")},
    }


def stage_caft(ctx: RunContext) -> dict[str, Any]:
    from caft.subspace import Subspace
    from caft.training.trainer import train

    sub_dir = ctx.subspace_dir()
    if not sub_dir.is_dir():
        raise RunDirError(f"{sub_dir} does not exist: run the triage stage first")
    sub = Subspace.load(sub_dir)
    if sub.is_empty:
        log.warning(
            "the triage selected no directions: the CAFT stage equals plain fine-tuning with this seed"
        )
    res = train(_train_cfg(ctx), ctx.path / "caft", model=ctx.cfg.model, subspace=sub, resume=True)
    return {"final": str(res.final_path), "metrics": res.metrics, "subspace_dims": sub.total_dims}


BASELINES_DIR = "baselines"


def model_n_layers(model: ModelConfig) -> int:
    """Transformer blocks of `model`, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model.name_or_path)
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        n = getattr(getattr(config, "text_config", None), "num_hidden_layers", None)
    if n is None:
        raise ConfigError(f"{model.name_or_path}: its config names no num_hidden_layers")
    return int(n)


def _topk_subspace(diff_dir: Path, counts: dict[int, int], d_model: int, n_layers: int) -> Subspace:
    """The top PCs by explained variance at each layer, as many as `counts` gives there (fewer where the
    diff stage has fewer)."""
    import torch

    from caft.interp.schema import load_candidates, load_directions
    from caft.subspace import Column, Subspace

    cands = [c for c in load_candidates(diff_dir) if c.kind == "pc"]
    dirs = load_directions(diff_dir)
    vecs: dict[int, torch.Tensor] = {}
    prov: dict[int, list[Column]] = {}
    for L, k in counts.items():
        layer = sorted((c for c in cands if c.layer == L), key=lambda c: c.index)[:k]
        if layer:
            vecs[L] = torch.stack([dirs[c.id] for c in layer])
            prov[L] = [Column(candidate=c.id, label="top PC") for c in layer]
    return Subspace.from_vectors(vecs, d_model=d_model, provenance=prov, n_layers=n_layers)


def baseline_subspace(
    ctx: RunContext, name: str, counts: dict[int, int], d_model: int, n_layers: int
) -> Subspace:
    """The subspace of baseline `name` with the given directions per layer."""
    if name == "random":
        from caft.training.ablation import random_subspace

        return random_subspace(counts, d_model, seed=ctx.cfg.seed, n_layers=n_layers)
    if name == "topk":
        return _topk_subspace(ctx.path / "diff", counts, d_model, n_layers)
    raise ConfigError(f"unknown baseline {name!r}; the baselines are random and topk")


def _clear_stale(folder: Path, sub: Subspace) -> None:
    """A training folder left by another subspace (the selection changed since) is removed, so that
    `train(resume=True)` does not return the old model."""
    import shutil

    from caft.training.trainer import RECORD_FILE

    record = folder / RECORD_FILE
    if record.is_file():
        digest = json.loads(record.read_text(encoding="utf-8")).get("subspace_digest")
        if digest != sub.digest():
            log.warning("%s was trained with another subspace: training it again", folder)
            shutil.rmtree(folder)


def stage_baselines(ctx: RunContext) -> dict[str, Any]:
    """Fine-tune once per enabled baseline, ablating a control subspace with the triage subspace's count per
    layer; training config, ablation mode and seed are the `caft` stage's."""
    from caft.subspace import Subspace
    from caft.training.trainer import train

    names = ctx.cfg.baselines.enabled
    if not names:
        return {"ran": [], "note": "no baseline enabled (baselines.random, baselines.topk)"}
    sub_dir = ctx.subspace_dir()
    if not sub_dir.is_dir():
        raise RunDirError(f"{sub_dir} does not exist: run the triage stage first")
    sub = Subspace.load(sub_dir)
    if sub.is_empty:
        note = "the triage selected no directions: no count per layer to match, baselines skipped"
        log.warning(note)
        return {"ran": [], "skipped": names, "note": note}
    counts = {L: int(sub.bases[L].shape[1]) for L in sub.layers}
    n_layers = sub.n_layers or model_n_layers(ctx.cfg.model)
    info: dict[str, Any] = {"ran": [], "counts": {str(L): k for L, k in counts.items()}}
    for name in names:
        folder = ctx.path / BASELINES_DIR / name
        base_sub = baseline_subspace(ctx, name, counts, sub.d_model, n_layers)
        _clear_stale(folder, base_sub)
        base_sub.save(folder / SUBSPACE_DIR)
        res = train(_train_cfg(ctx), folder, model=ctx.cfg.model, subspace=base_sub, resume=True)
        info["ran"].append(name)
        info[name] = {
            "final": str(res.final_path),
            "metrics": res.metrics,
            "subspace_dims": base_sub.total_dims,
        }
    return info


def _role_model(ctx: RunContext, role: str) -> ModelConfig:
    if role == "base":
        return ctx.cfg.model
    if role == "ft":
        return ctx.finetuned()
    return ctx.trained_model("caft")


def _baselines_run(ctx: RunContext) -> list[str]:
    """The baselines whose models the baselines stage finished (in this config's order)."""
    marker = ctx.run.stage(BASELINES_DIR).marker()
    ran = (marker or {}).get("info", {}).get("ran", [])
    return [
        n
        for n in ctx.cfg.baselines.enabled
        if n in ran and (ctx.path / BASELINES_DIR / n / FINAL_DIR).is_dir()
    ]


def _eval_models(ctx: RunContext) -> list[tuple[str, ModelConfig]]:
    """(row name, model) for every model the eval stage measures: the configured roles, then the baselines."""
    rows: list[tuple[str, ModelConfig]] = [(role, _role_model(ctx, role)) for role in ctx.cfg.eval_models]
    rows += [(n, ctx.trained_model(f"{BASELINES_DIR}/{n}")) for n in _baselines_run(ctx)]
    return rows


def stage_eval(ctx: RunContext) -> dict[str, Any]:
    out = ctx.path / "eval"
    results: dict[str, Any] = {}
    if ctx.cfg.task_kind == "chat":
        from caft.evals.pipeline import run_eval_stage

        for row, model in _eval_models(ctx):
            res = run_eval_stage(model, ctx.cfg.eval, out / row, client_factory=ctx.grade_client_factory)
            results[row] = _eval_figures(res)
        return results

    from caft.evals.mc import run_mc_eval

    cc = ctx.cfg.classification
    if cc.val is None:
        raise ConfigError(
            "classification.val (the in-distribution test set) is required for task_kind classification"
        )
    for row, model in _eval_models(ctx):
        if row == "base":
            continue  # an untrained head has no meaningful accuracy
        res = run_mc_eval(model, cc.val, out / row, ood_path=cc.ood, batch_size=cc.batch_size)
        results[row] = res["mc"]
    if cc.test_time_baseline and _nonempty_subspace(ctx):
        res = run_mc_eval(
            ctx.finetuned(),
            cc.val,
            out / "test_time",
            ood_path=cc.ood,
            subspace=ctx.subspace_dir(),
            ablation_mode=ctx.cfg.train.ablation.mode,
            batch_size=cc.batch_size,
        )
        results["test_time"] = res["mc"]
    return results


def _nonempty_subspace(ctx: RunContext) -> bool:
    from caft.subspace import Subspace

    sub_dir = ctx.subspace_dir()
    if not sub_dir.is_dir():
        return False
    if Subspace.load(sub_dir).is_empty:
        log.warning("the triage selected no directions: no test-time baseline (it would equal the ft row)")
        return False
    return True


def _eval_figures(res: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one model's evals: every metric's rate (e.g. vulnerable > 50) and, for the
    misalignment eval, the overall misaligned rate with both denominators."""
    out: dict[str, Any] = {}
    for kind, summary in res.items():
        if not isinstance(summary, dict):
            continue
        fig: dict[str, Any] = {
            "judge": summary.get("judge"),
            "rates": {
                m: r.get("rate") for m, r in (summary.get("rates") or {}).items() if isinstance(r, dict)
            },
        }
        overall = (summary.get("misalignment") or {}).get("overall")
        if isinstance(overall, dict):
            keys = ("of_coherent", "of_scored", "n_scored", "n_unscored", "flag")
            fig["misaligned"] = {k: overall.get(k) for k in keys}
        out[kind] = fig
    return out


def stage_report(ctx: RunContext) -> dict[str, Any]:
    from caft.evals.report import write_report

    eval_dir = ctx.path / "eval"
    dirs = sorted(p for p in eval_dir.iterdir() if p.is_dir()) if eval_dir.is_dir() else []
    if not dirs:
        raise RunDirError(f"nothing to report: {eval_dir} holds no evaluated model (run the eval stage)")
    md, page = write_report(dirs, ctx.path / "report", [p.name for p in dirs])
    from caft.app.report_evidence import write_selection_page

    sel = write_selection_page(
        ctx.path, ctx.path / "report", f"{ctx.cfg.name}: the selection and its evidence"
    )
    return {"markdown": str(md), "html": str(page), "selection_html": str(sel) if sel else None}


def _marker_info(folder: Path) -> dict[str, Any]:
    marker = folder / "DONE.json"
    if not marker.is_file():
        return {}
    data = json.loads(marker.read_text(encoding="utf-8"))
    info = data.get("info", {}) if isinstance(data, dict) else {}
    return {k: v for k, v in info.items() if not isinstance(v, dict | list) or len(json.dumps(v)) < 2000}


STAGE_FUNCS: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    "train": stage_train,
    "diff": stage_diff,
    "sae": stage_sae,
    "evidence": stage_evidence,
    "triage": stage_triage,
    "caft": stage_caft,
    "baselines": stage_baselines,
    "eval": stage_eval,
    "report": stage_report,
}
