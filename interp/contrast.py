"""Minimal pairs from a task's own concept words: which directions respond to which concept.

A task description may name example words for each value of the concepts its data varies in
(`concept_words: {sentiment: {positive: [...], negative: [...]}, topic: {...}}`). For one concept, every text
of a reference set (the generic corpus, and optionally the diff stage's inputs) that contains words of that
concept gets a twin with each of those words swapped for a word of the concept's other value; everything
else is held fixed. The difference of the twins' mean-pooled base activations at a layer is that concept's
shift, oriented from the first value to the second. No labels are involved: the pairs come from the concept
words, not from the training labels.

Two uses:
- evidence: a direction's response to each concept = mean, spread and count of the projected shifts
  (`ConceptResponse`, the dossier's `contrast` section), which separates concepts that co-vary in the
  fine-tuning data;
- a candidate basis: per layer and concept, the unit mean shift and the top principal components of the
  shifts (`contrast_candidates`), judged like any other candidate.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from caft.errors import DataError
from caft.interp.config import ContrastConfig
from caft.interp.inputs import Example, make_batches
from caft.interp.schema import Candidate, ConceptResponse

if TYPE_CHECKING:
    from caft.interp.source import ActivationSource

log = logging.getLogger(__name__)

ConceptWords = Mapping[str, Mapping[str, Sequence[str]]]
"""concept name -> {value name -> example words}; exactly two values per concept."""

CONTRAST_SOURCE = "contrast"
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


@dataclass(frozen=True)
class Pair:
    """Two texts that differ only in one concept's words: `low` holds the first value's words, `high` the
    second's."""

    low: str
    high: str


def check_concepts(concepts: ConceptWords) -> None:
    """Each concept needs exactly two values, each with at least one word, and no word in both."""
    for name, values in concepts.items():
        if len(values) != 2:
            raise DataError(
                f"concept_words[{name!r}] has {len(values)} value(s) ({', '.join(values)}); give exactly two "
                "(e.g. positive and negative), each with a few example words"
            )
        sets = [{w.lower() for w in ws} for ws in values.values()]
        if not all(sets):
            raise DataError(f"concept_words[{name!r}]: every value needs at least one word")
        both = sets[0] & sets[1]
        if both:
            raise DataError(f"concept_words[{name!r}]: {sorted(both)[:5]} appear under both values")


def _match_case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def build_pairs(
    texts: Sequence[str], values: Mapping[str, Sequence[str]], seed: int, max_pairs: int
) -> list[Pair]:
    """Minimal pairs for one concept: texts whose concept words all belong to one value get a twin with each
    of them replaced by a random word of the other value (case kept). Texts with words of both values, or
    none, are skipped. At most `max_pairs`, in text order; deterministic for a seed."""
    names = list(values)
    lists = [[w.lower() for w in values[n]] for n in names]
    which = {w: i for i, ws in enumerate(lists) for w in ws}
    rng = random.Random(f"caft-contrast:{seed}:{'|'.join(names)}")
    out: list[Pair] = []
    seen: set[str] = set()
    for text in texts:
        if len(out) >= max_pairs:
            break
        hits = [m for m in _WORD.finditer(text) if m.group(0).lower() in which]
        found = {which[m.group(0).lower()] for m in hits}
        if len(found) != 1 or text in seen:
            continue
        seen.add(text)
        side = found.pop()
        other = lists[1 - side]
        parts, last = [], 0
        for m in hits:
            parts += [text[last : m.start()], _match_case(rng.choice(other), m.group(0))]
            last = m.end()
        twin = "".join([*parts, text[last:]])
        out.append(Pair(low=text, high=twin) if side == 0 else Pair(low=twin, high=text))
    return out


def pooled_activations(
    source: ActivationSource, texts: Sequence[str], layers: Sequence[int], batch_size: int = 64
) -> dict[int, torch.Tensor]:
    """{layer: (len(texts), d)} base-model residual outputs, mean-pooled over each text's tokens (the
    positions the classifier pools; special tokens included)."""
    tok = source.tokenizer
    examples = []
    for i, t in enumerate(texts):
        ids = [int(x) for x in tok(t, truncation=True, max_length=512)["input_ids"]]
        examples.append(Example(doc=str(i), input_ids=ids, select=[True] * len(ids)))
    d = source.sites.d_model
    out = {L: torch.zeros(len(texts), d) for L in layers}
    with torch.no_grad():
        for batch in make_batches(examples, batch_size, source.pad_id):
            hidden = source.hidden("base", batch, list(layers))
            mask = batch.attention_mask.to(source.device).unsqueeze(-1).float()
            rows = torch.tensor([int(x) for x in batch.docs])
            for L in layers:
                pooled = (hidden[L].float() * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[L][rows] = pooled.cpu()
    return out


@dataclass
class ConceptShifts:
    """Per layer, the (n_pairs, d) activation shifts of one concept (second value minus first)."""

    concept: str
    values: tuple[str, str]
    shifts: dict[int, torch.Tensor]

    @property
    def n(self) -> int:
        return int(next(iter(self.shifts.values())).shape[0]) if self.shifts else 0


def concept_shifts(
    source: ActivationSource,
    concepts: ConceptWords,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    seed: int = 0,
    max_pairs: int = 512,
    batch_size: int = 64,
) -> list[ConceptShifts]:
    """The shifts of every concept that has at least two pairs in `texts` (a concept with fewer is logged and
    left out: its words do not occur in the texts)."""
    check_concepts(concepts)
    out: list[ConceptShifts] = []
    for name, values in concepts.items():
        pairs = build_pairs(texts, values, seed, max_pairs)
        if len(pairs) < 2:
            log.warning(
                "contrast: concept %r has %d minimal pair(s) in %d texts (its words hardly occur there); "
                "left out",
                name,
                len(pairs),
                len(texts),
            )
            continue
        lo = pooled_activations(source, [p.low for p in pairs], layers, batch_size)
        hi = pooled_activations(source, [p.high for p in pairs], layers, batch_size)
        v0, v1 = list(values)
        out.append(ConceptShifts(name, (v0, v1), {L: hi[L] - lo[L] for L in layers}))
    return out


def responses(shifts: Sequence[ConceptShifts], layer: int, direction: torch.Tensor) -> list[ConceptResponse]:
    """A unit direction's response to each concept at `layer`: mean, spread and count of the projected
    shifts; `share` = the mean over the length of the concept's mean shift (1 = the direction is that shift)."""
    out: list[ConceptResponse] = []
    u = direction.float() / direction.float().norm().clamp(min=1e-12)
    for s in shifts:
        if layer not in s.shifts:
            continue
        x = s.shifts[layer]
        proj = x @ u
        mean = float(proj.mean())
        std = float(proj.std()) if proj.numel() > 1 else 0.0
        norm = float(x.mean(0).norm())
        out.append(
            ConceptResponse(
                id=f"contrast:{s.concept}",
                concept=s.concept,
                values=list(s.values),
                mean=round(mean, 6),
                std=round(std, 6),
                n=int(proj.numel()),
                share=round(mean / norm, 4) if norm > 0 else 0.0,
                effect=round(mean / std, 4) if std > 0 else 0.0,
            )
        )
    return out


def basis_directions(shifts: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Up to `k` orthonormal directions of one concept's (n, d) shifts: the unit mean shift first, then the top
    principal components of the shifts with the mean direction projected out."""
    mean = shifts.mean(0)
    m = mean / mean.norm().clamp(min=1e-12)
    out = [m]
    if k > 1 and shifts.shape[0] > 2:
        rest = shifts - shifts.mean(0)
        rest = rest - (rest @ m).unsqueeze(1) * m
        _, _, vh = torch.linalg.svd(rest, full_matrices=False)
        out += [vh[i] for i in range(min(k - 1, vh.shape[0]))]
    return out


def contrast_candidates(
    shifts: Sequence[ConceptShifts], k: int
) -> tuple[list[Candidate], dict[str, torch.Tensor]]:
    """`k` candidates per concept and layer (`vec:L<layer>:ct-<concept>-<i>`, kind `vector`, source
    `contrast:<concept>`); scores: the share of the concept's shift variance along each."""
    cands: list[Candidate] = []
    dirs: dict[str, torch.Tensor] = {}
    for s in shifts:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", s.concept).strip("-").lower() or "concept"
        for L, x in sorted(s.shifts.items()):
            total = float((x**2).sum()) or 1.0
            for i, v in enumerate(basis_directions(x, k)):
                cid = f"vec:L{L}:ct-{slug}-{i}"
                cands.append(
                    Candidate(
                        id=cid,
                        kind="vector",
                        layer=L,
                        index=i,
                        source=f"{CONTRAST_SOURCE}:{s.concept}",
                        scores={"contrast_share": round(float(((x @ v) ** 2).sum()) / total, 6)},
                    )
                )
                dirs[cid] = v.contiguous()
    return cands, dirs


CONTRAST_DIR = "contrast"
"""Under the evidence stage folder: the contrast basis candidates (`candidates.jsonl`, `directions.safetensors`)."""


def corpus_texts(path: str | Path, max_docs: int | None = None) -> list[str]:
    """The text of each plain-text row of a corpus JSONL (chat rows have no single text and are skipped)."""
    from caft.rundir import iter_jsonl

    out = [str(r["text"]) for r in iter_jsonl(path) if isinstance(r, dict) and isinstance(r.get("text"), str)]
    return out[:max_docs] if max_docs is not None else out


def evidence_shifts(
    cfg: ContrastConfig,
    source: ActivationSource,
    corpus: str | Path | None,
    layers: Sequence[int],
    *,
    max_docs: int | None = None,
    batch_size: int = 64,
) -> list[ConceptShifts]:
    """The shifts the evidence stage reports against (empty when contrast is off, no concepts are named,
    or there is no text corpus to build pairs from)."""
    if not cfg.enabled or not cfg.concepts:
        return []
    if corpus is None:
        log.warning(
            "contrast: no text corpus (evidence.corpus) to build minimal pairs from; no contrast section"
        )
        return []
    texts = corpus_texts(corpus, max_docs)
    return concept_shifts(
        source, cfg.concepts, texts, layers, seed=cfg.seed, max_pairs=cfg.max_pairs, batch_size=batch_size
    )
