"""Readable corpus windows: the text each token adds (the tokenizer's own decode), whole words, and
near-duplicate removal.

Token strings are unreadable as they stand: WordPiece marks continuations with `##`, SentencePiece marks word
starts with `▁`, byte-level BPE with `Ġ`. The evidence stage therefore records, per token, the *piece* the
token adds to the decoded text, found with the tokenizer's own `decode` on the previous token and this one
(`decode([prev, tok])` minus `decode([prev])`): a piece that starts a word begins with a space. Words are runs
of pieces; a window is shown as words separated by spaces with the peak word marked.

Windows from the same document around the same position, or whose word sets overlap by more than a Jaccard
ratio of 0.8 (the same sentence in several corpus documents), repeat one piece of evidence; `dedupe_windows`
keeps the strongest of each group.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from caft.interp.schema import Window

DUPLICATE_JACCARD = 0.8
"""Two windows whose normalized word sets overlap more than this count as one."""

_SPECIAL = re.compile(r"^(\[[A-Za-z_]+\]|<\|?/?[A-Za-z_]+\|?>)$")
_WORD_START = ("Ġ", "▁")


class Detokenizer:
    """Pieces of token ids under one tokenizer, with a cache (corpora repeat token pairs a lot)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
        self._cache: dict[tuple[int, int], str] = {}

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, clean_up_tokenization_spaces=False))

    def piece(self, prev: int | None, tok: int) -> str:
        """The text `tok` adds after `prev` (None: at the start of a document); '' for special tokens."""
        if tok in self.special:
            return ""
        key = (-1 if prev is None or prev in self.special else prev, tok)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        alone = self._decode([tok])
        if key[0] < 0:
            text = alone
        else:
            before = self._decode([key[0]])
            both = self._decode([key[0], tok])
            # a byte split inside a character, or a decoder that rewrites the join: fall back to a new word
            text = both[len(before) :] if both.startswith(before) and "\ufffd" not in both else " " + alone
        self._cache[key] = text
        return text

    def pieces(self, ids: Sequence[int], start: int, stop: int) -> list[str]:
        """Pieces of `ids[start:stop]`, each decoded after its true predecessor in `ids`."""
        return [self.piece(int(ids[p - 1]) if p > 0 else None, int(ids[p])) for p in range(start, stop)]


@dataclass
class Word:
    """One word of a window: its text, its strongest 0-10 mark, its value at that token, and whether the
    window's peak token is in it."""

    text: str
    scaled: int
    value: float
    peak: bool


def _fallback_pieces(tokens: Sequence[str]) -> list[str]:
    """Pieces guessed from token strings (dossiers written before pieces were recorded): with word-start
    markers (`▁`, `Ġ`) a token without one continues the word; otherwise (WordPiece) only `##` continues."""
    marked = any(t.startswith(_WORD_START) for t in tokens)
    out: list[str] = []
    for t in tokens:
        if _SPECIAL.match(t.strip()):
            out.append("")
        elif t.startswith("##"):
            out.append(t[2:])
        elif t.startswith(_WORD_START):
            out.append(" " + t[1:])
        elif marked or t[:1].isspace():
            out.append(t)
        else:
            out.append(" " + t)
    return out


def window_pieces(w: Window) -> list[str]:
    """The window's pieces: recorded ones, else guessed from the token strings."""
    if w.pieces is not None and len(w.pieces) == len(w.tokens):
        return list(w.pieces)
    return _fallback_pieces(w.tokens)


def window_words(w: Window) -> list[Word]:
    """The window as words: a word starts at a piece that begins with whitespace; punctuation that follows
    a word without a space stays attached to it."""
    words: list[Word] = []
    for i, (piece, s) in enumerate(zip(window_pieces(w), w.scaled, strict=False)):
        if not piece:
            continue
        v = w.values[i] if i < len(w.values) else 0.0
        if piece[:1].isspace() or not words:
            words.append(Word(piece.strip(), s, v, i == w.peak))
            continue
        last = words[-1]
        last.text += piece
        if s > last.scaled:
            last.scaled, last.value = s, v
        last.peak = last.peak or i == w.peak
    return [x for x in words if x.text]


def window_text(w: Window) -> str:
    """The window as plain text."""
    return " ".join(x.text for x in window_words(w))


def _norm_words(w: Window) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", window_text(w).lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def dedupe_windows(
    windows: Sequence[Window], keep: int, threshold: float = DUPLICATE_JACCARD, span: int = 0
) -> list[Window]:
    """The first `keep` windows (in the given order: strongest first) that repeat no kept one: not the same
    document within `span` positions of a kept peak, not a word set overlapping a kept one by more than
    `threshold` (Jaccard). Kept windows are renumbered `ex:<sign>:<rank>`."""
    kept: list[Window] = []
    sets: list[frozenset[str]] = []
    for w in windows:
        if len(kept) >= keep:
            break
        ws = _norm_words(w)
        near = any(
            k.doc == w.doc
            and k.position is not None
            and w.position is not None
            and abs(k.position - w.position) <= span
            for k in kept
        )
        if near or any(jaccard(ws, s) > threshold for s in sets):
            continue
        kept.append(w)
        sets.append(ws)
    return [w.model_copy(update={"id": f"ex:{w.sign}:{i}"}) for i, w in enumerate(kept)]
