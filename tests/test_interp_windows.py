"""Readable windows: pieces from the tokenizer's own decode, words, and near-duplicates dropped."""

from __future__ import annotations

from pathlib import Path

from caft.interp.schema import Window
from caft.interp.windows import Detokenizer, dedupe_windows, window_text, window_words


def _window(tokens: list[str], pieces: list[str] | None, peak: int, doc: str = "d", pos: int = 0) -> Window:
    n = len(tokens)
    scaled = [10 if i == peak else 0 for i in range(n)]
    return Window(
        id="ex:max:9",
        sign="max",
        doc=doc,
        tokens=tokens,
        values=[float(s) for s in scaled],
        scaled=scaled,
        peak=peak,
        value=10.0,
        position=pos,
        pieces=pieces,
    )


def test_wordpiece_pieces_join_into_words_with_spaces(minilm_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    ids = tok("She wrote an atrocious, lousy note about the golf.")["input_ids"]
    pieces = Detokenizer(tok).pieces(ids, 0, len(ids))
    toks = tok.convert_ids_to_tokens(ids)
    assert "##cious" in toks and pieces[0] == "" and pieces[-1] == ""  # [CLS] / [SEP] add nothing
    peak = toks.index("##cious")
    w = _window(toks, pieces, peak)
    assert window_text(w) == "she wrote an atrocious, lousy note about the golf."
    words = window_words(w)
    assert [x.text for x in words if x.peak] == ["atrocious,"] and words[3].scaled == 10


def test_old_dossiers_without_pieces_are_guessed_from_markers() -> None:
    wp = _window(["[CLS]", "at", "##ro", "##cious", "food", "[SEP]"], None, 2)
    assert window_text(wp) == "atrocious food"
    sp = _window(["▁the", "▁gol", "f", "▁is", "▁great"], None, 1)
    assert window_text(sp) == "the golf is great" and [x.text for x in window_words(sp) if x.peak] == ["golf"]


def test_near_duplicates_are_dropped_and_the_rest_renumbered() -> None:
    def w(text: str, doc: str, pos: int) -> Window:
        words = text.split()
        return _window(words, [" " + x for x in words], 1, doc, pos)

    ws = [
        w("some say ri is great", "a", 2),
        w("some say ri is great", "b", 2),  # the same sentence in another document
        w("some say ri is great today", "c", 2),  # Jaccard 5/6 > 0.8
        w("some say tennis is great", "d", 2),  # 4/6: kept
        w("people keep calling the game", "d", 5),  # the same document within the span of a kept peak
        w("people keep calling the game", "e", 5),
    ]
    kept = dedupe_windows(ws, keep=10, span=4)
    assert [k.doc for k in kept] == ["a", "d", "e"] and [k.id for k in kept] == [
        "ex:max:0",
        "ex:max:1",
        "ex:max:2",
    ]
    assert len(dedupe_windows(ws, keep=2, span=4)) == 2
