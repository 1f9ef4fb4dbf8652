"""A judge benchmark with ground truth: how well a judge's verdicts find the directions that carry the cue.

Inputs: a dataset folder in caft's spurious format (`docs/demo.md`: val / ood rows `{"text", "label", "cue"}`,
`meta.json`) and a run folder that went through diff + evidence (+ the triage stage's random controls).

1. The judge (any kind: `offline-embedding`, an LLM provider string, or the mock replaying recorded replies)
   reads, blind, the run's candidates with `heldout_per_layer` random directions per layer mixed in among
   them; the remaining random directions are its calibration controls. The real triage path runs
   (`run_triage`: rendering, validation, calibration, selection). The judge sees dossiers and the task text
   only; the labels are read after it has finished (and `_assert_label_free` checks its inputs).
2. Ground truth (`caft.agent.bench_truth`), per direction: the Pearson correlation of its projection (the base model's residual output at
   the direction's layer, mean-pooled over each row's tokens) with the cue and with the label, on the val and
   OOD rows balanced so that each (label, cue) cell has the same count: there the two concepts vary
   independently. "Truly undesired": |r_cue| >= `r_cue` (0.3) and |r_intended| < `r_intended` (0.2).
3. Scores: the undesired score (the offline judge's calibrated z; for LLM judges the mean undesired
   confidence over a direction's verdicts, 0 for other relations) gives the AUROC; "flagged" (undesired at the threshold used, before the per-layer limits) and
   "selected" (after them) give precision and recall on the candidates and the false-positive rate on the
   held-out random directions. Top-k by variance with the same count per layer is the reference row.

`bench.json` holds every number and the definition; `bench.md` the table; `directions.jsonl` one line per
direction (correlations, score, verdict). A demo seed folder's `results.json` adds the downstream OOD figures.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from caft.agent.bench_table import format_bench
from caft.agent.bench_truth import balanced, correlations, labelled_rows
from caft.agent.config import OFFLINE_KIND, SelectionPolicy, TriageConfig
from caft.agent.judges import control_score
from caft.agent.schema import VerdictRecord
from caft.config import CaftConfig, ModelConfig
from caft.errors import ConfigError, DataError
from caft.interp.schema import (
    CANDIDATES_FILE,
    DIRECTIONS_FILE,
    Dossier,
    dossier_filename,
    load_directions,
    load_dossiers,
)
from caft.rundir import atomic_write_json, atomic_write_text, iter_jsonl

if TYPE_CHECKING:
    import torch

    from caft.llm import Provider

log = logging.getLogger(__name__)

BENCH_FILE = "bench.json"
TABLE_FILE = "bench.md"
DIRECTIONS_TABLE = "directions.jsonl"
# where a run keeps random control directions: the triage stage's folder, or the older demo layout
CONTROL_DIRS = ("triage/controls", "controls")


class BenchConfig(CaftConfig):
    """`caft triage bench`: score a judge against correlation ground truth."""

    data: str
    """Dataset folder in the spurious format (meta.json, val / ood JSONL with `label` and `cue`)."""
    run: str
    """Run folder holding diff/ (candidates), evidence/ (dossiers) and the random controls' evidence."""
    out: str | None = None
    """Output folder (default: `<run>/bench/<judge kind>`)."""
    triage: TriageConfig = Field(default_factory=TriageConfig)
    """The judge and its selection policy (default: the run manifest's triage section)."""
    model: ModelConfig | None = None
    """The base model for the ground truth (default: the run manifest's `model`)."""
    heldout_per_layer: int = Field(default=10, ge=0)
    """Random directions per layer mixed in blind among the candidates (the rest calibrate the judge)."""
    r_cue: float = Field(default=0.3, gt=0, le=1)
    """Truly undesired: |r with the cue| at least this ..."""
    r_intended: float = Field(default=0.2, gt=0, le=1)
    """... and |r with the label| below this."""
    seed: int = 0
    """Seed of the held-out split and of the balancing."""
    batch_size: int = Field(default=64, gt=0)
    """Rows per forward pass for the ground truth."""
    results: str | None = None
    """A demo seed's `results.json` (or its folder): the downstream OOD figures for the table."""


# ---- inputs ------------------------------------------------------------------------------------------------


def is_random(d: Dossier) -> bool:
    c = d.candidate
    return c.source == "random" or ":null" in c.id


def run_dossiers(run: Path) -> tuple[list[Dossier], list[Dossier]]:
    """(candidates, random directions) of a run: every dossier of its evidence and controls' evidence."""
    found: dict[str, Dossier] = {}
    for folder in [run / "evidence", *(run / c / "evidence" for c in CONTROL_DIRS)]:
        if (folder / "dossiers").is_dir():
            for d in load_dossiers(folder):
                found.setdefault(d.candidate.id, d)
    if not found:
        raise DataError(f"{run}: no dossiers in evidence/ (run the diff and evidence stages first)")
    cands = [d for d in found.values() if not is_random(d)]
    rand = [d for d in found.values() if is_random(d)]
    if not rand:
        raise DataError(
            f"{run}: no random control dossiers (triage/controls/evidence); run the triage stage with "
            "triage.controls_per_layer > 0 (the demo does) so the benchmark has random directions"
        )
    return cands, rand


def run_directions(run: Path) -> dict[str, torch.Tensor]:
    """Every direction of the run's candidate and control folders (the contrast basis included)."""
    from caft.interp.contrast import CONTRAST_DIR

    folders = [run / "diff", run / "sae", run / "evidence" / CONTRAST_DIR, *(run / c for c in CONTROL_DIRS)]
    files = [
        p / DIRECTIONS_FILE
        for p in folders
        if (p / CANDIDATES_FILE).is_file() and (p / DIRECTIONS_FILE).is_file()
    ]
    return load_directions(files)


def split_random(rand: Sequence[Dossier], per_layer: int, seed: int) -> tuple[list[Dossier], list[Dossier]]:
    """(held out: judged as candidates, calibration controls), `per_layer` held out at each layer."""
    by_layer: dict[int, list[Dossier]] = defaultdict(list)
    for d in sorted(rand, key=lambda x: x.candidate.id):
        by_layer[d.candidate.layer].append(d)
    rng = random.Random(seed)
    held: list[Dossier] = []
    calib: list[Dossier] = []
    for layer in sorted(by_layer):
        ds = by_layer[layer]
        rng.shuffle(ds)
        k = min(per_layer, len(ds) // 2)  # keep at least half for calibration
        held += ds[:k]
        calib += ds[k:]
    return held, calib


def _leaks(obj: Any) -> list[str]:
    """Ground truth inside a JSON value: a labelled row (a dict with `text` and `label` or `cue`) or a
    benchmark correlation (`r_cue`, `r_intended`)."""
    if isinstance(obj, dict):
        found = [k for k in ("r_cue", "r_intended") if k in obj]
        if "text" in obj and ({"label", "cue"} & set(obj)):
            found.append("a labelled row")
        return found + [x for v in obj.values() for x in _leaks(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _leaks(v)]
    return []


def _assert_label_free(folder: Path) -> None:
    """The judge's input files hold no labelled row and no correlation: selection never sees the truth."""
    for f in folder.rglob("*.json"):
        leaked = _leaks(json.loads(f.read_text(encoding="utf-8")))
        assert not leaked, f"{f} holds ground truth ({sorted(set(leaked))}): the judge must not see it"


def _write_inputs(root: Path, judged: Sequence[Dossier], controls: Sequence[Dossier]) -> tuple[Path, Path]:
    ev, ctl = root / "evidence", root / "controls"
    for folder, ds in ((ev, judged), (ctl, controls)):
        (folder / "dossiers").mkdir(parents=True, exist_ok=True)
        for old in (folder / "dossiers").glob("*.json"):
            old.unlink()
        for d in ds:
            (folder / "dossiers" / dossier_filename(d.candidate.id)).write_text(
                d.model_dump_json(), encoding="utf-8"
            )
    _assert_label_free(root)
    return ev, ctl


# ---- metrics -----------------------------------------------------------------------------------------------


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Probability that a positive outscores a negative (ties count half); None without both classes."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def undesired_score(records: Sequence[VerdictRecord], policy: SelectionPolicy) -> float:
    """A direction's undesired score for the AUROC: the offline judge's calibrated z (mean over records); for an
    LLM judge the signed confidence (mean over records: +confidence for `undesired`, -confidence for `intended`,
    0 for `unrelated` / `unclear`), so a confident "the task needs this" ranks below "neither"; with
    `score: relevance` the mean relevance. The selection's scale (`control_score`) is unchanged."""
    zs = [float(r.scores["z"]) for r in records if "z" in r.scores]
    if zs:
        return statistics.fmean(zs)
    if policy.score == "relevance":
        return control_score(records, policy) or 0.0
    signs = {"undesired": 1.0, "intended": -1.0}
    judged = [r.verdict for r in records if r.verdict is not None]
    if not judged:
        return 0.0
    return statistics.fmean(signs.get(v.relation, 0.0) * v.confidence for v in judged)


def _pr(picked: set[str], truth: set[str]) -> dict[str, float | int | None]:
    hit = len(picked & truth)
    return {
        "n": len(picked),
        "hits": hit,
        "precision": hit / len(picked) if picked else None,
        "recall": hit / len(truth) if truth else None,
    }


def _topk_ids(cands: Sequence[Dossier], counts: dict[int, int]) -> set[str]:
    """The top PCs by variance (their first ranking, else index) with `counts` per layer."""
    by_layer: dict[int, list[Dossier]] = defaultdict(list)
    for d in cands:
        by_layer[d.candidate.layer].append(d)
    out: set[str] = set()
    for layer, n in counts.items():
        ranked = sorted(
            by_layer.get(layer, []),
            key=lambda d: (min(d.candidate.ranks.values(), default=d.candidate.index), d.candidate.id),
        )
        out |= {d.candidate.id for d in ranked[:n]}
    return out


def _demo_results(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise DataError(f"{p} not found: pass a demo seed's results.json (OUT/seed<N>/results.json)")
    data = json.loads(p.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if isinstance(v, dict) and "ood" in v}


# ---- the benchmark -----------------------------------------------------------------------------------------


def _manifest(run: Path) -> dict[str, Any]:
    p = run / "manifest.json"
    if not p.is_file():
        return {}
    cfg = json.loads(p.read_text(encoding="utf-8")).get("config", {})
    return cfg if isinstance(cfg, dict) else {}


def run_bench(cfg: BenchConfig, provider: Provider | None = None) -> dict[str, Any]:
    """Judge the run's candidates and held-out random directions blind, then score the verdicts against the
    ground truth; writes bench.json, bench.md and directions.jsonl. Returns the bench.json content."""
    from caft.agent.schema import Selection
    from caft.agent.selection import load_verdicts
    from caft.agent.triage import run_triage

    started = time.perf_counter()
    run, data = Path(cfg.run), Path(cfg.data)
    manifest = _manifest(run)
    tcfg = cfg.triage
    if tcfg.task is None:
        task = manifest.get("triage", {}).get("task") or manifest.get("task")
        if task is None and (data / "task.yaml").is_file():
            task = str(data / "task.yaml")
        if task is None:
            raise ConfigError("the judge needs a task description: set triage.task (or run with a task.yaml)")
        tcfg = tcfg.model_copy(update={"task": task})
    kind = tcfg.kind if tcfg.kind == OFFLINE_KIND else tcfg.judge.model.replace("/", "_")
    out = Path(cfg.out) if cfg.out is not None else run / "bench" / kind
    out.mkdir(parents=True, exist_ok=True)

    cands, rand = run_dossiers(run)
    held, calib = split_random(rand, cfg.heldout_per_layer, cfg.seed)
    ev, ctl = _write_inputs(out / "judge_input", [*cands, *held], calib)
    dirs = run_directions(run)
    dfile = out / "judge_input" / DIRECTIONS_FILE
    from safetensors.torch import save_file

    judged_ids = {d.candidate.id for d in [*cands, *held]}
    save_file({k: v.contiguous() for k, v in dirs.items() if k in judged_ids}, str(dfile))
    t0 = time.perf_counter()
    res = run_triage(tcfg, ev, out / "triage", controls_dir=ctl, directions_path=dfile, provider=provider)
    judge_s = time.perf_counter() - t0

    # the judge has finished: only now are the labels read
    model = cfg.model or (ModelConfig.model_validate(manifest["model"]) if "model" in manifest else None)
    if model is None:
        raise ConfigError(f"{run} has no manifest naming the base model; pass model: (name_or_path)")
    rows = balanced(labelled_rows(data), cfg.seed)
    t0 = time.perf_counter()
    every = [*cands, *held]
    truth = correlations(
        model, rows, dirs, {d.candidate.id: d.candidate.layer for d in every}, out, cfg.batch_size
    )
    truth_s = time.perf_counter() - t0
    sel: Selection = res.selection
    records = load_verdicts(out / "triage" / "verdicts.jsonl")
    by_id: dict[str, list[Any]] = defaultdict(list)
    for r in records:
        by_id[r.candidate].append(r)
    policy = tcfg.selection
    if sel.calibration is not None and "threshold" in sel.calibration:
        field = "relevance_threshold" if policy.score == "relevance" else "threshold"
        policy = policy.model_copy(update={field: sel.calibration["threshold"]})
    report = _score(cfg, cands, held, truth, by_id, sel, policy)
    own = run / "triage" / "selection.json"
    if (
        own.is_file()
    ):  # the selection the run trained with (all controls calibrating): the downstream subspace
        picked = {c["candidate"] for c in json.loads(own.read_text(encoding="utf-8")).get("selected", [])}
        true_ids = {r["id"] for r in report["directions"] if r["truly_undesired"] and not r["random"]}
        report["run_selection"] = _pr(picked & {d.candidate.id for d in cands}, true_ids)
    report |= {
        "judge": res.summary.get("judge"),
        "out": str(out),
        "kind": tcfg.kind,
        "blind": tcfg.blind,
        "task": tcfg.task,
        "data": str(data),
        "run": str(run),
        "ground_truth": {
            "corpus": "val + ood rows, balanced: every (label, cue) cell the same size",
            "rows": len(rows),
            "projection": "base model residual output at the direction's layer, mean-pooled over tokens",
            "truly_undesired": f"|r_cue| >= {cfg.r_cue} and |r_intended| < {cfg.r_intended}",
            "held_out_random": "random directions judged blind among the candidates (never calibration)",
        },
        "calibration": sel.calibration,
        "policy": sel.policy,
        "downstream": _demo_results(cfg.results),
        "seconds": {
            "judge": round(judge_s, 1),
            "ground_truth": round(truth_s, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "usage": res.summary.get("usage"),
    }
    rows_text = "".join(json.dumps(x) + "\n" for x in report.pop("directions"))
    atomic_write_text(out / DIRECTIONS_TABLE, rows_text)
    atomic_write_json(out / BENCH_FILE, report)
    atomic_write_text(out / TABLE_FILE, format_bench(report))
    return report


def _score(
    cfg: BenchConfig,
    cands: Sequence[Dossier],
    held: Sequence[Dossier],
    truth: dict[str, dict[str, float]],
    by_id: dict[str, list[Any]],
    sel: Any,
    policy: Any,
) -> dict[str, Any]:
    def undesired(cid: str) -> bool:
        t = truth[cid]
        return abs(t["r_cue"]) >= cfg.r_cue and abs(t["r_intended"]) < cfg.r_intended

    selected = {c.candidate for c in sel.selected}
    flagged = selected | set(sel.dropped)
    cand_ids = [d.candidate.id for d in cands]
    held_ids = [d.candidate.id for d in held]
    true_ids = {c for c in cand_ids if undesired(c)}
    carriers = {
        c for c in cand_ids if abs(truth[c]["r_cue"]) >= cfg.r_cue
    }  # the cue, with or without the label
    score = {c: undesired_score(by_id.get(c, []), policy) for c in [*cand_ids, *held_ids]}
    counts: dict[int, int] = defaultdict(int)
    layer_of = {d.candidate.id: d.candidate.layer for d in [*cands, *held]}
    for c in selected & set(cand_ids):
        counts[layer_of[c]] += 1
    topk = _topk_ids(cands, dict(counts))
    rows = []
    for d in [*cands, *held]:
        cid = d.candidate.id
        rec = next((r for r in by_id.get(cid, []) if r.verdict is not None), None)
        rows.append(
            {
                "id": cid,
                "layer": d.candidate.layer,
                "random": cid in held_ids,
                **truth[cid],
                "truly_undesired": cid in true_ids,
                "score": round(score[cid], 4),
                "flagged": cid in flagged,
                "selected": cid in selected,
                "relation": rec.verdict.relation if rec is not None and rec.verdict is not None else None,
                "label": rec.verdict.label if rec is not None and rec.verdict is not None else None,
            }
        )
    return {
        "candidates": len(cand_ids),
        "truly_undesired": len(true_ids),
        "base_rate": len(true_ids) / len(cand_ids) if cand_ids else None,
        "auroc": auroc([score[c] for c in cand_ids], [c in true_ids for c in cand_ids]),
        "auroc_vs_random": auroc(
            [score[c] for c in [*true_ids, *held_ids]], [c in true_ids for c in [*true_ids, *held_ids]]
        ),
        "flagged": _pr(flagged & set(cand_ids), true_ids),
        "selected": _pr(selected & set(cand_ids), true_ids),
        "topk_matched": _pr(topk, true_ids),
        "cue_carriers": {
            "definition": f"|r_cue| >= {cfg.r_cue} (whatever r_intended)",
            "n": len(carriers),
            "auroc": auroc([score[c] for c in cand_ids], [c in carriers for c in cand_ids]),
            "selected": _pr(selected & set(cand_ids), carriers),
            "topk_matched": _pr(topk, carriers),
        },
        "random_heldout": {
            "n": len(held_ids),
            "flagged": len(flagged & set(held_ids)),
            "selected": len(selected & set(held_ids)),
            "fpr_flagged": len(flagged & set(held_ids)) / len(held_ids) if held_ids else None,
            "fpr_selected": len(selected & set(held_ids)) / len(held_ids) if held_ids else None,
            "mean_score": statistics.fmean(score[c] for c in held_ids) if held_ids else None,
            "truly_undesired": sum(undesired(c) for c in held_ids),
            "selected_truly_undesired": sum(undesired(c) for c in selected & set(held_ids)),
        },
        "selected_per_layer": dict(sorted(counts.items())),
        "directions": rows,
    }


def replay_provider(exchanges: str | Path) -> Provider:
    """A mock provider that answers each single-shot prompt with the reply recorded for the same user message
    in an `exchanges.jsonl` (of an earlier triage or benchmark run, e.g. with a strong LLM); a prompt with no
    recorded reply is a fatal error that names the file. When the recording holds the system prompt and the live
    one differs (the prompts changed since), the reply is still used and a warning says so once: it is the
    earlier prompt's answer."""
    import hashlib

    from caft.llm import FatalError, GenerateConfig, Message, MockProvider

    def key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    path = Path(exchanges)
    if not path.is_file():
        raise DataError(f"{path} not found: pass the exchanges.jsonl of a triage run to replay")
    table: dict[str, tuple[str, str | None]] = {}
    for x in iter_jsonl(path):
        msgs, replies = x.get("messages") or [], x.get("replies") or []
        users = [m for m in msgs if m.get("role") == "user"]
        systems = [str(m.get("content", "")) for m in msgs if m.get("role") == "system"]
        if users and replies:  # the first user message and its last reply (after any repair round)
            recorded_system = key("\n\n".join(systems)) if systems else None
            table[key(str(users[0].get("content", "")))] = (str(replies[-1]), recorded_system)
    warned = False

    def reply(messages: list[Message], config: GenerateConfig) -> Any:
        nonlocal warned
        del config
        users = [m for m in messages if m.role == "user"]
        hit = table.get(key(users[0].content)) if users else None
        if hit is None:
            return FatalError(
                f"no recorded reply in {path} for this prompt (rendered differently, or never judged); "
                "re-record the replies with the same triage config"
            )
        text, recorded_system = hit
        live_system = key("\n\n".join(m.content for m in messages if m.role == "system"))
        if recorded_system is not None and recorded_system != live_system and not warned:
            warned = True
            log.warning(
                "%s: replies recorded under a different system prompt than caft renders now; they are "
                "replayed as recorded (the earlier prompt's answers)",
                path,
            )
        return text

    return MockProvider("replay", reply)
