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
from caft.app.baselines import (
    BASELINES_DIR,
    baseline_models,
    stage_baselines,
    task_metric,
)
from caft.app.baselines import baseline_subspace as baseline_subspace  # re-exported (moved there)
from caft.app.baselines import model_n_layers as model_n_layers  # re-exported (moved there)
from caft.app.overlap import prompt_overlap
from caft.app.run_config import RunConfig
from caft.config import ModelConfig
from caft.errors import ConfigError, IncompleteError, ModelError, RunDirError
from caft.rundir import DIRECTIONS_FILE, RunDir

if TYPE_CHECKING:
    from caft.llm.types import Provider
    from caft.subspace import Subspace
    from caft.training.config import TrainConfig
    from caft.training.trainer import TrainResult

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
        loop = _loop_record(self.path / stage) if stage == "caft" else None
        if loop is not None:
            final = Path(loop["final"])
        if not final.is_dir():
            raise RunDirError(
                f"{final} does not exist: run the `{stage}` stage first (caft run --only {stage})"
            )
        base = self.cfg.model
        if (final / "adapter_config.json").is_file():
            return base.model_copy(update={"adapter": str(final)})
        return base.model_copy(update={"name_or_path": str(final), "adapter": None})

    def fine_tune(self, cfg: TrainConfig, out: Path, subspace: Subspace | None = None) -> TrainResult:
        """One fine-tune of the run on its base model (resumed when its folder holds one), in
        `launch.processes` ranks."""
        from caft.training.launch import train_maybe_launched

        launch = self.cfg.launch
        return train_maybe_launched(
            cfg, out, model=self.cfg.model, subspace=subspace, processes=launch.processes, fsdp=launch.fsdp
        )

    def finetuned(self) -> ModelConfig:
        return self.cfg.finetuned if self.cfg.finetuned is not None else self.trained_model("train")

    def subspace_dir(self) -> Path:
        return self.path / "triage" / "subspace"

    def final_subspace_dir(self) -> Path:
        """The subspace the CAFT model was trained with: the closed loop's last one, else the triage's."""
        loop = _loop_record(self.path / "caft")
        if loop is not None and loop.get("subspace"):
            return Path(loop["subspace"])
        return self.subspace_dir()


def _loop_record(caft_dir: Path) -> dict[str, Any] | None:
    from caft.app.loop import read_loop

    return read_loop(caft_dir)


# ---- stages -------------------------------------------------------------------------------------------------


def _train_cfg(ctx: RunContext) -> Any:
    tc = ctx.cfg.train
    if "seed" not in tc.model_fields_set:
        tc = tc.model_copy(update={"seed": ctx.cfg.seed})
    return tc


def stage_train(ctx: RunContext) -> dict[str, Any]:
    res = ctx.fine_tune(_train_cfg(ctx), ctx.path / "train")
    return {"final": str(res.final_path), "metrics": res.metrics}


def diff_config(ctx: RunContext) -> Any:
    """The diff config with the cross-stage defaults filled in (the training data as inputs)."""
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
    return cfg.model_copy(update={"inputs": inputs})


def stage_diff(ctx: RunContext) -> dict[str, Any]:
    from caft.interp.pca import run_diff

    cfg = diff_config(ctx)
    overlap = prompt_overlap(ctx.cfg, cfg.inputs.prompts, "diff") if cfg.inputs.generate else {}
    folder = run_diff(cfg, ctx.path, model=ctx.cfg.model, finetuned=ctx.finetuned())
    return {**_marker_info(folder), **overlap}


def stage_sae(ctx: RunContext) -> dict[str, Any]:
    from caft.interp.sae import run_sae_rank

    assert ctx.cfg.sae is not None
    inputs = ctx.cfg.sae.inputs
    overlap = prompt_overlap(ctx.cfg, inputs.prompts, "sae") if inputs is not None and inputs.generate else {}
    folder = run_sae_rank(ctx.cfg.sae, ctx.path, model=ctx.cfg.model, finetuned=ctx.finetuned())
    return {**_marker_info(folder), **overlap}


OFFLINE_JUDGE = OFFLINE_KIND
CONTROLS_DIR = "controls"
"""Under the triage folder: `triage/controls/` holds the random control candidates, and their evidence in
`triage/controls/evidence/` (built like the candidates' evidence, with the run's evidence config)."""


def uses_offline_judge(cfg: RunConfig) -> bool:
    return cfg.triage.kind == OFFLINE_JUDGE


def _candidate_dirs(ctx: RunContext) -> list[Path]:
    return ctx.run.layout.candidate_dirs()


def contrast_dir(ctx: RunContext) -> Path:
    """The evidence stage's contrast basis candidates (present when `evidence.contrast.basis` > 0)."""
    from caft.interp.contrast import CONTRAST_DIR

    return ctx.run.layout.stage("evidence") / CONTRAST_DIR


def stage_evidence(ctx: RunContext) -> dict[str, Any]:
    from caft.interp.evidence import build_dossiers

    steering = ctx.cfg.evidence.steering
    overlap = prompt_overlap(ctx.cfg, list(steering.prompts), "evidence") if steering.enabled else {}
    cfg = evidence_config(ctx.cfg, injected_judge=ctx.judge_provider is not None)
    folder = build_dossiers(cfg, ctx.path, model=ctx.cfg.model, finetuned=ctx.finetuned())
    return {**_marker_info(folder), **overlap}


def evidence_config(cfg: RunConfig, injected_judge: bool = False) -> Any:
    """The evidence section with the cross-stage defaults filled in: the contrast concepts from the task's
    `concept_words`, and the triage judge as the steering search's coherence judge when none is set, the
    search's coherence is `auto` and triage uses an LLM (not when tests or demos inject a scripted triage
    provider: its replies are not coherence verdicts)."""
    ev = cfg.evidence
    task = cfg.triage.task or cfg.task
    if ev.contrast.enabled and not ev.contrast.concepts and task is not None:
        from caft.agent.task import load_task

        words = load_task(task).concept_words
        if words:
            ev = ev.model_copy(update={"contrast": ev.contrast.model_copy(update={"concepts": words})})
    if ev.coherence_judge is not None or ev.steering.coherence == "perplexity" or not ev.steering.enabled:
        return ev
    if uses_offline_judge(cfg) or injected_judge:
        return ev
    return ev.model_copy(update={"coherence_judge": cfg.triage.judge})


def _build_controls(ctx: RunContext, n: int) -> Path:
    """`n` random directions per candidate layer, and their evidence; returns the controls' evidence folder.

    The evidence runs as its own small run rooted at `triage/controls/` (the evidence builder writes to
    `<root>/evidence`), reading the corpus and diff inputs from the run's diff stage."""
    from caft.interp.evidence import build_dossiers
    from caft.interp.schema import load_candidate_set, write_random_candidates

    dirs = _candidate_dirs(ctx)
    if not dirs:
        raise RunDirError(f"no candidates in {ctx.path}: run the diff stage first (caft run --from diff)")
    cands, directions = load_candidate_set(dirs)
    d_model = int(next(iter(directions.values())).shape[0])
    root = ctx.path / "triage" / CONTROLS_DIR
    cand_dir = write_random_candidates(root, d_model, sorted({c.layer for c in cands}), n, ctx.cfg.seed)
    ev = evidence_config(ctx.cfg, injected_judge=ctx.judge_provider is not None)
    cfg = ev.model_copy(
        update={"candidates": [str(cand_dir)], "contrast": ev.contrast.model_copy(update={"basis": 0})}
    )
    return build_dossiers(
        cfg, root, model=ctx.cfg.model, finetuned=ctx.finetuned(), diff_dir=ctx.run.layout.stage("diff")
    )


def _model_n_layers(ctx: RunContext) -> int | None:
    """The base model's layer count, recorded in the subspace (None when its config cannot be read)."""
    from caft.models import load_model_config

    try:
        config = load_model_config(ctx.cfg.model.name_or_path)
    except ModelError as e:
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


def _direction_dirs(ctx: RunContext) -> list[Path]:
    """Every folder whose directions the triage may select: the candidate stages and the contrast basis."""
    extra = [contrast_dir(ctx)] if (contrast_dir(ctx) / DIRECTIONS_FILE).is_file() else []
    return [*_candidate_dirs(ctx), *extra]


def triage_config(ctx: RunContext) -> Any:
    """The triage config with the run's task description as its default."""
    cfg = ctx.cfg.triage
    if cfg.task is None:
        if ctx.cfg.task is None:
            raise ConfigError(
                "the judge needs a task description: set `task` (or triage.task) in the run config"
            )
        cfg = cfg.model_copy(update={"task": ctx.cfg.task})
    return cfg


def stage_triage(ctx: RunContext) -> dict[str, Any]:
    from caft.agent.judges import make_judge
    from caft.agent.triage import run_triage

    cfg = triage_config(ctx)
    judge = make_judge(cfg, provider=ctx.judge_provider)
    controls = _build_controls(ctx, judge.controls_per_layer) if judge.controls_per_layer > 0 else None
    res = run_triage(
        cfg,
        ctx.run.layout.stage("evidence"),
        ctx.path / "triage",
        controls_dir=controls,
        directions_path=[d / DIRECTIONS_FILE for d in _direction_dirs(ctx)] or None,
        n_layers=_model_n_layers(ctx),
        judge=judge,
    )
    if not res.complete:
        raise IncompleteError(
            f"triage stopped before judging every candidate ({res.summary.get('stopped') or 'a budget was reached'}); "
            "its verdicts are kept. Rerun `caft run` to continue (raise the budget if it was reached), or review "
            "and apply the partial selection"
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

    sub_dir = ctx.subspace_dir()
    if not sub_dir.is_dir():
        raise RunDirError(f"{sub_dir} does not exist: run the triage stage first")
    sub = Subspace.load(sub_dir)
    if sub.is_empty:
        log.warning(
            "the triage selected no directions: the CAFT stage equals plain fine-tuning with this seed"
        )
    res = ctx.fine_tune(_train_cfg(ctx), ctx.path / "caft", subspace=sub)
    info = {"final": str(res.final_path), "metrics": res.metrics, "subspace_dims": sub.total_dims}
    if ctx.cfg.caft.loop_rounds > 0:
        from caft.app.loop import run_loop

        loop = run_loop(ctx, sub, res.final_path)
        info |= {"final": loop["final"], "subspace_dims": loop["subspace_dims"], "loop": loop}
    return info


def _role_model(ctx: RunContext, role: str) -> ModelConfig:
    if role == "base":
        return ctx.cfg.model
    if role == "ft":
        return ctx.finetuned()
    return ctx.trained_model("caft")


def _eval_models(ctx: RunContext) -> list[tuple[str, ModelConfig]]:
    """(row name, model) for every model the eval stage measures: the configured roles, then the baselines."""
    rows: list[tuple[str, ModelConfig]] = [(role, _role_model(ctx, role)) for role in ctx.cfg.eval_models]
    rows += [(row, ctx.trained_model(folder)) for row, folder in baseline_models(ctx)]
    return rows


def stage_eval(ctx: RunContext) -> dict[str, Any]:
    out = ctx.path / "eval"
    results: dict[str, Any] = {}
    if ctx.cfg.task_kind == "chat":
        from caft.evals.pipeline import run_eval_stages
        from caft.evals.report import TASK_KIND
        from caft.rundir import SUMMARY_FILE, atomic_write_json

        rows: list[tuple[str, ModelConfig, Any]] = [(row, model, None) for row, model in _eval_models(ctx)]
        if ctx.cfg.baselines.test_time and _nonempty_subspace(ctx):
            from caft.evals.test_time import test_time_generator

            model = ctx.finetuned()
            gen = test_time_generator(model, ctx.cfg.eval.sample, ctx.subspace_dir())
            rows.append(("test_time", model, gen))
        graded = run_eval_stages(rows, ctx.cfg.eval, out, client_factory=ctx.grade_client_factory)
        for row, res in graded.items():
            results[row] = _eval_figures(res)
            task = task_metric(ctx, row) if row != "test_time" else None
            if task is not None:
                atomic_write_json(out / row / TASK_KIND / SUMMARY_FILE, {"kind": TASK_KIND, "task": task})
                results[row]["task"] = task
        return results

    from caft.evals.mc import run_mc_eval
    from caft.training.runstate import MEANS_FILE

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
            subspace=ctx.final_subspace_dir(),
            ablation_mode=ctx.cfg.train.ablation.mode,
            batch_size=cc.batch_size,
            ablation_means=ctx.path / "caft" / MEANS_FILE,  # read by mode `mean` only
        )
        results["test_time"] = res["mc"]
    return results


def _nonempty_subspace(ctx: RunContext) -> bool:
    from caft.subspace import Subspace

    sub_dir = ctx.final_subspace_dir()
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
        st = summary.get("statistics")
        if isinstance(st, dict):  # the question-clustered figures, and Misalign@k
            fig["clustered"] = st["overall"]["figures"]
            fig["misalign_at_k"] = {str(m["k"]): m["value"] for m in st.get("misalign_at_k", [])}
        out[kind] = fig
    return out


def stage_report(ctx: RunContext) -> dict[str, Any]:
    from caft.evals.report import PAIRED_FILE, write_report

    eval_dir = ctx.path / "eval"
    found = {p.name: p for p in eval_dir.iterdir() if p.is_dir()} if eval_dir.is_dir() else {}
    if not found:
        raise RunDirError(f"nothing to report: {eval_dir} holds no evaluated model (run the eval stage)")
    # The run's rows first, in eval order (base, ft, caft, baselines), then anything else found there.
    order = [row for row, _ in _eval_models(ctx) if row in found] + ["test_time"]
    names = [n for n in order if n in found] + sorted(n for n in found if n not in order)
    reference = "ft" if "ft" in names else None
    marker = ctx.run.stage(BASELINES_DIR).marker()
    binfo = (marker or {}).get("info", {})
    ran = [*binfo.get("ran", []), *(["test_time"] if "test_time" in names else [])]
    notes = [
        "Rows: base = the base model graded on the same prompts and samples; ft = the plain fine-tune; "
        "caft = CAFT; then every baseline that ran.",
        f"Baselines that ran: {', '.join(ran) or 'none'}"
        + (
            f" (skipped: {', '.join(binfo['skipped'])}: {binfo.get('note', '')})"
            if binfo.get("skipped")
            else ""
        )
        + ".",
    ]
    matched = (binfo.get("steps") or {}).get("matched_to_caft")
    if matched:
        notes.append(
            f"Early stopping at matched task metric: {matched['row']} (held-out loss {matched['eval_loss']:.4g}, "
            f"CAFT {matched['caft_eval_loss']:.4g})."
        )
    if reference:
        notes.append("The paired difference column compares each row with ft over the same questions.")
    md, page = write_report(
        [found[n] for n in names], ctx.path / "report", names, reference=reference, notes=notes
    )
    from caft.app.report_evidence import write_selection_page

    sel = write_selection_page(
        ctx.path, ctx.path / "report", f"{ctx.cfg.name}: the selection and its evidence"
    )
    caft_vs_ft = None
    if reference and (md.parent / PAIRED_FILE).is_file():
        pair = json.loads((md.parent / PAIRED_FILE).read_text(encoding="utf-8"))["runs"].get("caft")
        if pair:
            keys = ("difference", "ci_low", "ci_high", "p_value", "p_exact", "rate_a", "rate_b", "questions")
            caft_vs_ft = {k: pair[k] for k in keys}
    return {
        "markdown": str(md),
        "html": str(page),
        "caft_vs_ft": caft_vs_ft,
        "rows": names,
        "reference": reference,
        "baselines_ran": ran,
        "selection_html": str(sel) if sel else None,
    }


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
