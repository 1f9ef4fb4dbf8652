"""The offline judge: verdicts with no API at all, from sentence embeddings of the evidence.

What it reads: the task description (intended concept, undesired concepts) and, per candidate, the peak token
of every max / min window in its dossier. A direction that encodes a concept lights up on words of that
concept; so each peak word is embedded with all-MiniLM-L6-v2 (mean pooling) and compared with the concept
*terms* of the task (each description and its content words): margin(word) = best similarity to an undesired
term minus best similarity to an intended term.

Per end (max / min) the margins are averaged. A candidate reads as undesired when one end (better: both
ends, as in a food-versus-sports axis) is about the undesired concept and neither end is about the intended one: the shortcut directions of a spurious task
mix both concepts (one end "sports", the other "positive"), and ablating those removes the intended signal
too. So

    hi, lo = max(end_max, end_min), min(end_max, end_min)
    raw = hi + (both_ends * lo if lo > 0 else veto * lo)

Raw scores are not comparable across tasks and layers (a corpus full of topic words gives every direction
some topic peaks), so they are calibrated against the same score computed for random directions at the same
layer (dossiers built by the same evidence code: `null_dossiers`), or, when none are given, against the
candidates' own robust spread. The calibrated z-score becomes the verdict's relation and confidence.

It is also a cheap pre-filter: `rank_candidates` orders dossiers by z before an LLM judge sees them.
The embedder is `caft.agent.embedder.TextEmbedder`; the stopwords of the concept terms are
`prompts/data/stopwords.txt`; the settings are `caft.agent.config.OfflineJudgeConfig` (`triage.offline`).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

# OfflineJudgeConfig lives in agent.config; re-exported here for callers of its old home
from caft.agent.config import OFFLINE_KIND
from caft.agent.config import OfflineJudgeConfig as OfflineJudgeConfig
from caft.agent.embedder import TextEmbedder
from caft.agent.judges import JudgeRun
from caft.agent.schema import VERDICTS_FILE, JudgeVerdict, TaskDescription, VerdictRecord
from caft.errors import ConfigError
from caft.interp.schema import Dossier, Window

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

JUDGE_ID = OFFLINE_KIND


@cache
def stopwords() -> frozenset[str]:
    """Words too generic to stand for a concept in a task description (`prompts/data/stopwords.txt`)."""
    text = resources.files("caft.prompts").joinpath("data", "stopwords.txt").read_text("utf-8")
    return frozenset(w for w in (line.strip() for line in text.splitlines()) if w and not w.startswith("#"))


@dataclass
class EndScore:
    """How one end (max or min windows) of a candidate reads."""

    score: float
    """Mean margin (undesired minus intended similarity) over the end's windows."""
    words: list[str]
    """Peak word of each window, in window order."""
    margins: list[float]
    window_ids: list[str]


@dataclass
class CandidateScore:
    candidate: str
    layer: int
    raw: float
    max_end: EndScore
    min_end: EndScore
    z: float = 0.0
    null_mean: float = 0.0
    null_std: float = 1.0
    calibration: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    contrast_ids: frozenset[str] = frozenset()
    """Concepts of the dossier's contrast section (what a contrast verdict may cite)."""


def concept_terms(texts: Iterable[str]) -> list[str]:
    """Each description itself plus its content words (lower case, stopwords and short words dropped),
    in first-seen order, without duplicates."""
    out: list[str] = []
    stop = stopwords()
    for text in texts:
        text = text.strip()
        if not text:
            continue
        out.append(text)
        out += [w for w in re.findall(r"[a-z][a-z'-]+", text.lower()) if w not in stop and len(w) > 2]
    return list(dict.fromkeys(out))


def task_terms(task: TaskDescription) -> tuple[list[str], list[str]]:
    """(undesired terms, intended terms). An open setting with no undesired concepts listed cannot be judged
    by similarity: there is nothing to compare with."""
    undesired = concept_terms(task.undesired)
    intended = concept_terms([task.intended, *task.intended_concepts])
    if not undesired:
        raise ConfigError(
            f"task {task.name!r} lists no undesired concepts; the offline judge compares evidence with them. "
            "Add `undesired:` entries to the task YAML or use an LLM judge"
        )
    if not intended:
        raise ConfigError(
            f"task {task.name!r} has an empty `intended` description; describe the intended task"
        )
    return undesired, intended


_PIECE_PREFIXES = ("##",)
# [CLS], [SEP], <s>, </s>, <|endoftext|>, <pad>: structural tokens say nothing about a concept
_SPECIAL = re.compile(r"^(\[[A-Za-z_]+\]|<\|?/?[A-Za-z_]+\|?>)$")
_WORD_START = ("Ġ", "▁")


def peak_word(window: Window) -> str:
    """The whole word at the window's peak: WordPiece continuations (`##x`) are joined to their word; BPE /
    SentencePiece word-start markers (`Ġ`, `▁`) are respected."""
    toks = window.tokens
    if not toks:
        return ""
    p = min(max(window.peak, 0), len(toks) - 1)

    def continues(tok: str) -> bool:
        return tok.startswith(_PIECE_PREFIXES)

    def starts(tok: str) -> bool:
        return tok.startswith(_WORD_START) or tok[:1].isspace()

    sentencepiece = any(starts(t) for t in toks)
    s = p
    if sentencepiece:
        while s > 0 and not starts(toks[s]) and toks[s - 1][-1:].isalnum():
            s -= 1
    else:
        while s > 0 and continues(toks[s]):
            s -= 1
    e = p + 1
    if sentencepiece:
        while e < len(toks) and not starts(toks[e]) and toks[e][:1].isalnum():
            e += 1
    else:
        while e < len(toks) and continues(toks[e]):
            e += 1
    parts = [t[2:] if continues(t) else t for t in toks[s:e]]
    word = "".join(parts)
    for m in _WORD_START:
        word = word.replace(m, "")
    return word.strip()


class OfflineJudge:
    """Scores dossiers against a task by embedding similarity and turns calibrated scores into verdicts."""

    def __init__(
        self,
        task: TaskDescription,
        config: OfflineJudgeConfig | None = None,
        embedder: TextEmbedder | None = None,
    ) -> None:
        self.task = task
        self.config = config or OfflineJudgeConfig()
        self.embedder = embedder or TextEmbedder(self.config.model_path, self.config.batch_size)
        self.undesired_terms, self.intended_terms = task_terms(task)
        self._eu = self.embedder.embed(self.undesired_terms)  # (U, d)
        self._ei = self.embedder.embed(self.intended_terms)  # (I, d)
        self._concept_margin: dict[str, float] = {}

    def concept_margin(self, concept: str, values: Sequence[str] = ()) -> float:
        """How undesired a named concept reads: the mean margin of its name, its values and its example
        words (the task's `concept_words`). > 0: undesired, < 0: intended. The task description decides,
        the concept words only name what varies."""
        if concept not in self._concept_margin:
            words = self.task.concept_words.get(concept, {})
            texts = [concept, *(values or list(words)), *(w for ws in words.values() for w in ws)]
            self._concept_margin[concept] = statistics.fmean(self.word_margins(texts))
        return self._concept_margin[concept]

    def contrast_shares(self, dossier: Dossier) -> tuple[float, float] | None:
        """(largest |share| over the undesired concepts, over the intended ones) of the dossier's contrast
        section; None when it has none or its concepts are all on one side."""
        und = [abs(r.share) for r in dossier.contrast if self.concept_margin(r.concept, r.values) > 0]
        itd = [abs(r.share) for r in dossier.contrast if self.concept_margin(r.concept, r.values) <= 0]
        if not und:
            return None
        return max(und), max(itd, default=0.0)

    # ------------------------------------------------------------------ scoring
    def word_margins(self, words: Sequence[str]) -> list[float]:
        """Best similarity to an undesired term minus best similarity to an intended term, per word."""
        if not words:
            return []
        e = self.embedder.embed(list(words))  # (W, d)
        su = (e @ self._eu.T).max(dim=1).values
        si = (e @ self._ei.T).max(dim=1).values
        return [float(x) for x in (su - si)]

    def _end(self, windows: Sequence[Window]) -> EndScore:
        words = [peak_word(w) for w in windows]
        keep = [i for i, w in enumerate(words) if w and not _SPECIAL.match(w)]
        words = [words[i] for i in keep]
        ids = [windows[i].id for i in keep]
        margins = self.word_margins(words)
        score = statistics.fmean(margins) if margins else 0.0
        return EndScore(score, words, margins, ids)

    def score(self, dossier: Dossier) -> CandidateScore:
        top, bottom = self._end(dossier.max_examples), self._end(dossier.min_examples)
        ends = [e.score for e in (top, bottom) if e.words]
        if not ends:
            raw = 0.0
        else:
            hi, lo = max(ends), min(ends)
            # a second end about the undesired concept adds (a contrast axis: food vs sports); an end
            # about the intended concept vetoes (a shortcut direction mixing both concepts)
            raw = hi + (self.config.both_ends * lo if lo > 0 else self.config.veto * lo)
        out = CandidateScore(dossier.candidate.id, dossier.candidate.layer, raw, top, bottom)
        shares = self.contrast_shares(dossier) if self.config.use_contrast else None
        if shares is not None:
            out.raw = shares[0] - self.config.contrast_veto * shares[1]
            out.extra = {"windows_raw": raw, "share_undesired": shares[0], "share_intended": shares[1]}
            out.contrast_ids = frozenset(r.concept for r in dossier.contrast)
        return out

    def score_all(
        self, dossiers: Sequence[Dossier], null_dossiers: Sequence[Dossier] = ()
    ) -> list[CandidateScore]:
        """Raw scores, calibrated to z against null dossiers (random directions) or the candidates themselves."""
        # one batched embedding pass over every peak word (the per-end calls then hit the cache)
        words = {
            peak_word(w) for d in (*dossiers, *null_dossiers) for w in (*d.max_examples, *d.min_examples)
        }
        self.embedder.embed(sorted(w for w in words if w))
        scores = [self.score(d) for d in dossiers]
        mode = self.config.calibration
        if mode == "auto":
            mode = "random" if null_dossiers else "candidates"
        if mode == "random" and not null_dossiers:
            raise ConfigError(
                "offline judge calibration 'random' needs dossiers of random directions (null_dossiers); "
                "build them with the evidence stage or use calibration 'candidates'"
            )
        if mode == "random":
            nulls = [self.score(d) for d in null_dossiers]
            by_layer: dict[int, list[float]] = {}
            for n in nulls:
                by_layer.setdefault(n.layer, []).append(n.raw)
            pooled = [n.raw for n in nulls]
            for s in scores:
                ref = by_layer.get(s.layer, [])
                if len(ref) < self.config.min_null:
                    ref = pooled
                _calibrate(s, ref, robust=False, how="random")
        else:
            by_layer_c: dict[int, list[float]] = {}
            for s in scores:
                by_layer_c.setdefault(s.layer, []).append(s.raw)
            for s in scores:
                ref = by_layer_c[s.layer]
                if len(ref) < self.config.min_null:
                    ref = [x.raw for x in scores]
                _calibrate(s, ref, robust=True, how="candidates")
        return scores

    # ------------------------------------------------------------------ verdicts
    def verdict(self, s: CandidateScore) -> VerdictRecord:
        cfg = self.config
        weak = "share_undesired" in s.extra and s.extra["share_undesired"] < cfg.contrast_min_share
        if s.z >= cfg.z_threshold and not weak:
            relation: Literal["undesired", "intended", "unrelated"] = "undesired"
            confidence = _sigmoid(s.z - cfg.z_threshold)
        elif s.z <= cfg.intended_z:
            relation = "intended"
            confidence = _sigmoid(cfg.intended_z - s.z)
        else:
            relation = "unrelated"
            confidence = _sigmoid(min(s.z - cfg.intended_z, cfg.z_threshold - s.z))
        confidence = round(min(1.0, max(0.0, confidence)), 4)
        strong = max((s.max_end, s.min_end), key=lambda e: e.score)
        label = _label(strong.words, relation)
        evidence = _cited(s.max_end) + _cited(s.min_end)
        if "share_undesired" in s.extra:
            evidence = [f"contrast:{c}" for c in sorted(s.contrast_ids)] + evidence
        desc = (
            f"Max windows peak on: {_top_words(s.max_end.words)}. "
            f"Min windows peak on: {_top_words(s.min_end.words)}."
        )
        rationale = (
            f"Mean margin (undesired minus intended similarity) of the peak words: max end "
            f"{s.max_end.score:+.3f}, min end {s.min_end.score:+.3f}; score {s.raw:+.3f} is {s.z:+.2f} sd from "
            f"{s.calibration} (mean {s.null_mean:+.3f}, sd {s.null_std:.3f}); threshold {cfg.z_threshold:+.2f}."
        )
        if "share_undesired" in s.extra:
            rationale = (
                f"Minimal pairs: share of the undesired concepts' shift {s.extra['share_undesired']:.3f}, of the "
                f"intended ones' {s.extra['share_intended']:.3f}; score {s.raw:+.3f} is {s.z:+.2f} sd from "
                f"{s.calibration} (mean {s.null_mean:+.3f}, sd {s.null_std:.3f}); threshold "
                f"{cfg.z_threshold:+.2f}. Windows: max end {s.max_end.score:+.3f}, min end {s.min_end.score:+.3f}."
            )
        return VerdictRecord(
            candidate=s.candidate,
            judge=JUDGE_ID,
            method=JUDGE_ID,
            verdict=JudgeVerdict(
                label=label,
                description=desc,
                relation=relation,
                confidence=confidence,
                evidence=evidence,
                rationale=rationale,
            ),
            relevance=round(100.0 * _sigmoid(s.z - cfg.z_threshold), 2),
            scores={
                "raw": s.raw,
                "z": s.z,
                "max_end": s.max_end.score,
                "min_end": s.min_end.score,
                "null_mean": s.null_mean,
                "null_std": s.null_std,
                **s.extra,
            },
        )

    def judge(
        self, dossiers: Sequence[Dossier], null_dossiers: Sequence[Dossier] = ()
    ) -> list[VerdictRecord]:
        return [self.verdict(s) for s in self.score_all(dossiers, null_dossiers)]


def _calibrate(s: CandidateScore, ref: Sequence[float], robust: bool, how: str) -> None:
    if robust:
        med = statistics.median(ref)
        mad = statistics.median([abs(x - med) for x in ref]) * 1.4826
        mean, std = med, mad
    else:
        mean = statistics.fmean(ref)
        std = statistics.pstdev(ref) if len(ref) > 1 else 0.0
    std = max(std, 1e-6)
    s.null_mean, s.null_std, s.z = mean, std, (s.raw - mean) / std
    s.calibration = (
        "random directions at this layer" if how == "random" else "the candidates at this layer (robust)"
    )


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x))))


def _top_words(words: Sequence[str], k: int = 6) -> str:
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return ", ".join(f"{w} (x{c})" if c > 1 else w for w, c in top) or "(none)"


def _label(words: Sequence[str], relation: str) -> str:
    distinct = list(dict.fromkeys(words))[:3]
    return f"{relation}: {', '.join(distinct)}" if distinct else relation


def _cited(end: EndScore, k: int = 3) -> list[str]:
    """Ids of the windows whose words moved the score most."""
    order = sorted(range(len(end.margins)), key=lambda i: -abs(end.margins[i]))[:k]
    return [end.window_ids[i] for i in sorted(order)]


def rank_candidates(
    dossiers: Sequence[Dossier],
    task: TaskDescription,
    null_dossiers: Sequence[Dossier] = (),
    judge: OfflineJudge | None = None,
) -> list[tuple[str, float]]:
    """Pre-filter: (candidate id, calibrated z), most likely undesired first."""
    j = judge or OfflineJudge(task)
    scores = j.score_all(dossiers, null_dossiers)
    return sorted(((s.candidate, s.z) for s in scores), key=lambda t: -t[1])


def judge_offline(
    dossiers: Sequence[Dossier],
    task: TaskDescription,
    out_dir: str | Path | None = None,
    null_dossiers: Sequence[Dossier] = (),
    config: OfflineJudgeConfig | None = None,
    judge: OfflineJudge | None = None,
) -> list[VerdictRecord]:
    """Judge every dossier; with `out_dir`, append one VerdictRecord per line to verdicts.jsonl. Candidates
    already in the file keep their verdict (resume); all candidates are scored again because calibration
    looks at all of them."""
    from caft.rundir import JsonlWriter, read_jsonl

    j = judge or OfflineJudge(task, config)
    records = j.judge(dossiers, null_dossiers)
    if out_dir is None:
        return records
    path = Path(out_dir) / VERDICTS_FILE
    done: dict[str, VerdictRecord] = {}
    if path.exists():
        for row in read_jsonl(path):
            rec = VerdictRecord.model_validate(row)
            if rec.judge == JUDGE_ID:
                done[rec.candidate] = rec
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with JsonlWriter(path) as w:
        for rec in records:
            if rec.candidate not in done:
                w.write(rec.model_dump(mode="json"))
    log.info("offline judge: %d verdicts (%d already on file) -> %s", len(records), len(done), path)
    return [done.get(r.candidate, r) for r in records]


class OfflineEmbeddingJudge:
    """The `offline-embedding` judge of the triage stage (the `Judge` contract): `OfflineJudge` scores,
    calibrated against the control dossiers (random directions) when there are any."""

    name = JUDGE_ID

    def __init__(
        self,
        config: OfflineJudgeConfig | None = None,
        *,
        controls_per_layer: int = 20,
        embedder: TextEmbedder | None = None,
    ) -> None:
        self.config = config or OfflineJudgeConfig()
        self.controls_per_layer = controls_per_layer
        self.embedder = embedder

    async def judge(
        self,
        dossiers: Sequence[Dossier],
        task: TaskDescription,
        out_dir: Path,
        *,
        controls: Sequence[Dossier] = (),
        directions: Mapping[str, torch.Tensor] | None = None,
    ) -> JudgeRun:
        del directions  # the evidence text is all it reads
        if not controls and self.config.calibration == "auto":
            log.warning("offline judge: no control dossiers; calibrating against the candidates themselves")
        engine = OfflineJudge(task, self.config, embedder=self.embedder)
        records = judge_offline(dossiers, task, out_dir, controls, judge=engine)
        summary = {"judged": len(records)}
        return JudgeRun(records=records, complete=True, summary=summary)
