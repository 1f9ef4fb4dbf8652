"""Token sequences the interp passes run on: examples, padded batches, and JSONL rows turned into tokens.

    examples = read_examples("train.jsonl", tokenizer, prefix="data0", causal=True)
    for batch in make_batches(examples, 8, pad_id):
        batch.input_ids, batch.select          # (B, T) ids, (B, T) analysed positions

Batches are built on access, longest first, so that batch indices are stable resume points.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, overload

import torch

from caft.chat import ChatFormatter, validate_messages
from caft.errors import DataError
from caft.jsonl import SKIP_HINT, ReadReport, iter_rows
from caft.rundir import atomic_write_text, iter_jsonl

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from caft.chat import TemplateChoice

log = logging.getLogger(__name__)

INPUTS_FILE = "inputs.jsonl"


@dataclass
class Example:
    """One token sequence and which of its positions are analysed."""

    doc: str
    """Stable id: `<source>:<row>` (`data0:12`, `gen:3`, `corpus:7`)."""
    input_ids: list[int]
    select: list[bool]
    """Positions analysed (assistant tokens, or every token)."""

    def to_json(self) -> dict[str, Any]:
        return {"doc": self.doc, "input_ids": self.input_ids, "select": _spans(self.select)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        ids = [int(i) for i in d["input_ids"]]
        sel = [False] * len(ids)
        for a, b in d["select"]:
            for i in range(int(a), int(b)):
                sel[i] = True
        return cls(doc=str(d["doc"]), input_ids=ids, select=sel)


def _spans(mask: Sequence[bool]) -> list[list[int]]:
    out: list[list[int]] = []
    start = None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append([start, i])
            start = None
    return out


@dataclass
class TokenBatch:
    """A padded batch (right padding). `select` marks analysed positions (never padding)."""

    index: int
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    select: torch.Tensor  # (B, T) bool
    docs: list[str]
    examples: list[Example] = field(default_factory=list)

    @property
    def n_selected(self) -> int:
        return int(self.select.sum())


class Batches(Sequence[TokenBatch]):
    """Padded batches built on access (only the examples are held), so that a pass over millions of tokens
    holds one batch of token tensors at a time. Supports `len`, indexing, slicing and iteration."""

    def __init__(
        self, examples: Sequence[Example], plan: list[list[int]], pad_id: int, offset: int = 0
    ) -> None:
        self._examples = examples
        self._plan = plan
        self._pad_id = pad_id
        self._offset = offset

    def __len__(self) -> int:
        return len(self._plan)

    @overload
    def __getitem__(self, i: int) -> TokenBatch: ...
    @overload
    def __getitem__(self, i: slice) -> Batches: ...
    def __getitem__(self, i: int | slice) -> TokenBatch | Batches:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self._plan))
            if step != 1:
                raise ValueError("batches can only be sliced contiguously")
            return Batches(self._examples, self._plan[start:stop], self._pad_id, self._offset + start)
        if i < 0:
            i += len(self._plan)
        if not 0 <= i < len(self._plan):
            raise IndexError(i)
        return _pad([self._examples[j] for j in self._plan[i]], self._offset + i, self._pad_id)

    def __iter__(self) -> Iterator[TokenBatch]:
        for i in range(len(self._plan)):
            yield self[i]

    @property
    def n_selected(self) -> int:
        """Analysed tokens over all batches (without building them)."""
        return sum(sum(self._examples[j].select) for idx in self._plan for j in idx)


def _pad(chunk: list[Example], index: int, pad_id: int) -> TokenBatch:
    width = max(len(e.input_ids) for e in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(chunk), width), dtype=torch.long)
    sel = torch.zeros((len(chunk), width), dtype=torch.bool)
    for r, e in enumerate(chunk):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        att[r, :n] = 1
        sel[r, :n] = torch.tensor(e.select, dtype=torch.bool)
    return TokenBatch(index, ids, att, sel, [e.doc for e in chunk], chunk)


def make_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Batches:
    """Plan padded batches. Order is deterministic (longest first, ties by input order), so batch indices
    are stable resume points across runs."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    plan = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return Batches(examples, plan, pad_id)


def save_examples(path: str | Path, examples: Sequence[Example]) -> None:
    atomic_write_text(path, "".join(json.dumps(e.to_json()) + "\n" for e in examples))


def load_examples(path: str | Path) -> list[Example]:
    return [Example.from_json(row) for row in iter_jsonl(path)]


# ---- JSONL rows -> tokens --------------------------------------------------------------------------------


def encode_row(
    row: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    causal: bool,
    tokens: str,
    text_field: str,
    max_length: int,
    template: str,
    where: str,
) -> tuple[list[int], list[bool]]:
    """Token ids and the analysed positions of one JSONL row (chat or plain text)."""
    if "messages" in row:
        if not causal:
            raise DataError(
                f"{where}: chat rows need a causal LM; an encoder reads plain text rows {{{text_field!r}: ...}}"
            )
        messages = validate_messages(row["messages"], where)
        enc = ChatFormatter(tokenizer, cast("TemplateChoice", template)).encode(messages)
        ids, sel = list(enc.input_ids), list(enc.assistant_mask)
        if tokens == "all":
            sel = [True] * len(ids)
    elif isinstance(row.get(text_field), str):
        text = row[text_field]
        if not text.strip():
            raise DataError(f"{where}: empty {text_field!r}")
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        sel = [True] * len(ids)
    else:
        raise DataError(
            f"{where}: expected a chat row {{'messages': [...]}} or a text row {{{text_field!r}: '...'}} "
            f"(keys found: {sorted(row)[:8]}); set `inputs.text_field` if your text lives elsewhere"
        )
    return ids[:max_length], sel[:max_length]


def read_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prefix: str,
    causal: bool,
    tokens: str = "assistant",
    text_field: str = "text",
    max_length: int = 512,
    max_examples: int | None = None,
    template: str = "model",
    skip_invalid: bool = False,
    report: ReadReport | None = None,
) -> list[Example]:
    """Examples from a JSONL file of chat or text rows; rows with no analysed token are skipped. A bad row
    (not UTF-8, not JSON, not a chat or text row) is a line-numbered error, or with `skip_invalid` is left
    out and recorded in `report`."""
    out: list[Example] = []
    skipped = 0
    rep = report if report is not None else ReadReport()
    for i, row in enumerate(iter_rows(path, skip_invalid=skip_invalid, report=rep, hint=SKIP_HINT)):
        if max_examples is not None and i >= max_examples:
            break
        where = f"{path}:{row.line}"
        try:
            ids, sel = encode_row(
                row.data,
                tokenizer,
                causal=causal,
                tokens=tokens,
                text_field=text_field,
                max_length=max_length,
                template=template,
                where=where,
            )
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{e} ({SKIP_HINT})") from None
            rep.skip(row.line, str(e).removeprefix(where + ": "))
            continue
        if not any(sel):
            skipped += 1
            continue
        out.append(Example(f"{prefix}:{i}", ids, sel))
    if skipped:
        log.warning("%s: %d rows had no analysed tokens after truncation and were skipped", path, skipped)
    if rep.skipped:
        log.warning(
            "%s: skipped %d invalid row(s) (first: line %d: %s)", path, len(rep.skipped), *rep.skipped[0]
        )
    return out


def check_rows(path: str | Path, *, text_field: str = "text", skip_invalid: bool = False) -> ReadReport:
    """The cheap part of `read_examples`, before any model loads: every row decodes, is JSON, and is a valid
    chat row or a non-empty text row. Raises the same line-numbered errors (unless `skip_invalid`)."""
    rep = ReadReport()
    for row in iter_rows(path, skip_invalid=skip_invalid, report=rep, hint=SKIP_HINT):
        where = f"{path}:{row.line}"
        try:
            if "messages" in row.data:
                validate_messages(row.data["messages"], where)
            elif not (isinstance(row.data.get(text_field), str) and row.data[text_field].strip()):
                raise DataError(
                    f"{where}: expected a chat row {{'messages': [...]}} or a text row {{{text_field!r}: '...'}} "
                    f"(keys found: {sorted(row.data)[:8]})"
                )
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{e} ({SKIP_HINT})") from None
            rep.skip(row.line, str(e).removeprefix(where + ": "))
    return rep
