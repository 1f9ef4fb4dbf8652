"""Training data: JSONL readers with line-numbered validation, tokenization, and batch collation.

Two row formats:

* chat (OpenAI fine-tuning format): `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`;
  the loss covers assistant tokens only.
* classification / multiple choice: `{"text": ..., "label": <int or str>}` or
  `{"prompt": ..., "options": [...], "label": <option index or option text>}`.

A bad row stops reading with `path:line: problem`, unless the caller asks to skip bad rows; then each skipped
row is recorded in a `ReadReport` (line and reason) and the count is logged. Over-long examples are cut or
dropped as configured, and `TokenizeStats` counts both.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from caft.chat import leading_bos, validate_messages, with_bos
from caft.errors import DataError, ModelError
from caft.jsonl import SKIP_HINT, iter_rows
from caft.jsonl import ReadReport as ReadReport

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from caft.chat import ChatFormatter

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
T = TypeVar("T")


@dataclass(frozen=True)
class ChatExample:
    """One conversation; `line` is its line number in the source file (1-based)."""

    messages: list[dict[str, str]]
    line: int = 0


@dataclass(frozen=True)
class ClassificationExample:
    """A text with a label, or a prompt with options and the index (or text) of the right one."""

    label: int | str
    text: str | None = None
    prompt: str | None = None
    options: list[str] | None = None
    line: int = 0

    @property
    def is_choice(self) -> bool:
        return self.options is not None


def _read_rows(
    path: str | Path,
    parse: Callable[[dict[str, Any], str], T],
    skip_invalid: bool,
    report: ReadReport | None,
) -> list[T]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    rep = report if report is not None else ReadReport()
    out: list[T] = []
    for row in iter_rows(p, skip_invalid=skip_invalid, report=rep, allow_torn_tail=False, hint=SKIP_HINT):
        where = f"{p}:{row.line}"
        try:
            out.append(parse(row.data, where))
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{e} ({SKIP_HINT})") from None
            rep.skip(row.line, str(e).removeprefix(where + ": "))
    rep.kept = len(out)
    if rep.skipped:
        log.warning(
            "%s: skipped %d invalid row(s) of %d (first: line %d: %s)",
            p,
            len(rep.skipped),
            rep.rows,
            rep.skipped[0][0],
            rep.skipped[0][1],
        )
    if not out:
        why = f"all {rep.rows} rows were invalid" if rep.rows else "the file has no rows"
        raise DataError(f"{p}: no usable examples ({why})")
    return out


def _parse_chat(obj: dict[str, Any], where: str) -> ChatExample:
    if "messages" not in obj:
        raise DataError(
            f"{where}: no `messages` field (expected {{'messages': [{{'role', 'content'}}, ...]}})"
        )
    line = int(where.rsplit(":", 1)[1])
    return ChatExample(validate_messages(obj["messages"], where=where), line=line)


def read_chat_jsonl(
    path: str | Path, skip_invalid: bool = False, report: ReadReport | None = None
) -> list[ChatExample]:
    """Chat SFT rows. A row that is not JSON, has no assistant turn, an unknown role or empty content is an
    error naming its line, or is skipped and counted in `report` when `skip_invalid`."""
    return _read_rows(path, _parse_chat, skip_invalid, report)


def _parse_classification(obj: dict[str, Any], where: str) -> ClassificationExample:
    line = int(where.rsplit(":", 1)[1])
    if "label" not in obj:
        raise DataError(f"{where}: no `label` field")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, int | str):
        raise DataError(f"{where}: `label` must be an integer or a string, got {label!r}")
    if isinstance(label, str) and not label.strip():
        raise DataError(f"{where}: `label` is empty")
    if "options" in obj:
        prompt, options = obj.get("prompt"), obj["options"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: a multiple-choice row needs a non-empty `prompt` string")
        if (
            not isinstance(options, list)
            or len(options) < 2
            or not all(isinstance(o, str) and o.strip() for o in options)
        ):
            raise DataError(f"{where}: `options` must be a list of at least two non-empty strings")
        if len(options) > len(LETTERS):
            raise DataError(f"{where}: at most {len(LETTERS)} options are supported, got {len(options)}")
        if isinstance(label, str):
            if label not in options:
                raise DataError(f"{where}: label {label!r} is not one of the options")
            label = options.index(label)
        elif not 0 <= label < len(options):
            raise DataError(f"{where}: label index {label} is out of range for {len(options)} options")
        return ClassificationExample(label=label, prompt=prompt, options=list(options), line=line)
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: expected a non-empty `text` (or `prompt` + `options` for multiple choice)")
    return ClassificationExample(label=label, text=text, line=line)


def read_classification_jsonl(
    path: str | Path, skip_invalid: bool = False, report: ReadReport | None = None
) -> list[ClassificationExample]:
    """Classification rows `{"text", "label"}` or multiple-choice rows `{"prompt", "options", "label"}`."""
    return _read_rows(path, _parse_classification, skip_invalid, report)


def split_holdout(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic (train, held-out) split; the held-out part gets round(fraction * n) items (at least 1
    when fraction > 0), and training keeps at least one."""
    if fraction <= 0:
        return list(items), []
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_eval = min(max(1, round(fraction * len(items))), len(items) - 1)
    if n_eval <= 0:
        raise DataError(f"cannot hold out a fraction of {len(items)} example(s); pass a separate eval file")
    held = set(idx[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# ---- labels ---------------------------------------------------------------------------------------------
class LabelSpace:
    """Maps labels (int or str) to class indices 0..n-1."""

    def __init__(self, names: Sequence[str]) -> None:
        if len(names) < 2:
            raise DataError(f"classification needs at least two classes, got {list(names)}")
        if len(set(names)) != len(names):
            raise DataError(f"label names repeat: {list(names)}")
        self.names = [str(n) for n in names]
        self._index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def infer(
        cls, examples: Sequence[ClassificationExample], names: Sequence[str] | None = None
    ) -> LabelSpace:
        if names is not None:
            return cls(names)
        labels = {ex.label for ex in examples if not ex.is_choice}
        if not labels:
            n = max(len(ex.options or []) for ex in examples)
            return cls([LETTERS[i] for i in range(n)])
        if all(isinstance(x, int) for x in labels):
            ints = sorted(int(x) for x in labels)
            if ints[0] < 0:
                raise DataError(f"integer labels must be >= 0, found {ints[0]}")
            return cls([str(i) for i in range(max(ints[-1] + 1, 2))])
        if any(isinstance(x, int) for x in labels):
            raise DataError("labels mix integers and strings; use one kind (or set data.label_names)")
        return cls(sorted(str(x) for x in labels))

    def __len__(self) -> int:
        return len(self.names)

    def index(self, label: int | str, line: int = 0) -> int:
        if isinstance(label, int):
            if not 0 <= label < len(self.names):
                raise DataError(f"line {line}: label {label} is out of range for {len(self.names)} classes")
            return label
        if label not in self._index:
            raise DataError(f"line {line}: label {label!r} is not one of {self.names}")
        return self._index[label]


# ---- tokenization ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tokenized:
    """One tokenized example. `labels` (chat): next-token targets, IGNORE_INDEX outside assistant tokens.
    `target` (classification): the class or option index. `line`: source line."""

    input_ids: list[int]
    labels: list[int] | None = None
    target: int | None = None
    line: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


def tokenize_chat(
    examples: Sequence[ChatExample],
    formatter: ChatFormatter,
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
) -> tuple[list[Tokenized], TokenizeStats]:
    """Token ids with labels on assistant tokens only. Truncation keeps the start; an example left with no
    assistant token after truncation is dropped and counted."""
    stats = TokenizeStats(examples=len(examples))
    out: list[Tokenized] = []
    for ex in examples:
        enc = formatter.encode(ex.messages)
        ids, mask = enc.input_ids, enc.assistant_mask
        if len(ids) > max_length:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            stats.truncated += 1
        # labels[t] = ids[t] where t is an assistant token; the model shifts them by one internally
        labels = [tok if m else IGNORE_INDEX for tok, m in zip(ids, mask, strict=True)]
        n_target = sum(1 for x in labels[1:] if x != IGNORE_INDEX)
        if n_target == 0:
            stats.dropped_no_target += 1
            continue
        out.append(Tokenized(input_ids=list(ids), labels=labels, line=ex.line))
        stats.tokens += len(ids)
        stats.target_tokens += n_target
    stats.kept = len(out)
    _check_kept(stats, max_length)
    return out, stats


def _check_kept(stats: TokenizeStats, max_length: int) -> None:
    if stats.dropped_overlong or stats.truncated or stats.dropped_no_target:
        log.info(
            "tokenized %d examples: %d truncated, %d dropped as over-long (> %d tokens), %d dropped with no "
            "target tokens left",
            stats.examples,
            stats.truncated,
            stats.dropped_overlong,
            max_length,
            stats.dropped_no_target,
        )
    if stats.kept == 0:
        raise DataError(
            f"no examples left after tokenization ({stats.dropped_overlong} over-long dropped, "
            f"{stats.dropped_no_target} without target tokens): raise data.max_length or use overlong=truncate"
        )


def choice_prompt(ex: ClassificationExample, labels: LabelSpace, space: bool = True) -> str:
    """The text a causal LM sees: the question, lettered options, and `Answer:` (the letter comes next)."""
    options = ex.options if ex.options is not None else labels.names
    question = ex.prompt if ex.prompt is not None else ex.text
    lines = [str(question), *(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))]
    return "\n".join(lines) + ("\nAnswer:" if space else "\nAnswer: ")


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, n: int) -> tuple[list[int], bool]:
    """Token ids of the answer letters A.. (n of them) as they follow `Answer:`: ` A` when every spaced
    letter is one token (returns space=True), else `A` after `Answer: `."""
    for space in (True, False):
        ids = []
        for letter in LETTERS[:n]:
            toks = tokenizer((" " if space else "") + letter, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                break
            ids.append(int(toks[0]))
        if len(ids) == n and len(set(ids)) == n:
            return ids, space
    raise ModelError(f"the tokenizer does not encode the answer letters A..{LETTERS[n - 1]} as single tokens")


def tokenize_choice(
    examples: Sequence[ClassificationExample],
    tokenizer: PreTrainedTokenizerBase,
    labels: LabelSpace,
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
) -> tuple[list[Tokenized], list[int], TokenizeStats]:
    """Prompts for letter scoring at the last position. Truncation cuts the *start* of the prompt, so the
    options and `Answer:` survive. Returns the examples, the letter token ids, and counts."""
    n_opts = max(len(ex.options) if ex.options is not None else len(labels) for ex in examples)
    letter_ids, space = letter_token_ids(tokenizer, n_opts)
    stats = TokenizeStats(examples=len(examples))
    out: list[Tokenized] = []
    bos = leading_bos(tokenizer)
    for ex in examples:
        target = ex.label if ex.is_choice else labels.index(ex.label, ex.line)
        assert isinstance(target, int)
        ids = list(tokenizer(choice_prompt(ex, labels, space), add_special_tokens=False)["input_ids"])
        room = max_length - (1 if bos is not None else 0)
        if len(ids) > room:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids = ids[len(ids) - room :]  # the BOS stays first
            stats.truncated += 1
        ids = with_bos(ids, bos)
        out.append(Tokenized(input_ids=ids, target=int(target), line=ex.line))
        stats.tokens += len(ids)
        stats.target_tokens += 1
    stats.kept = len(out)
    _check_kept(stats, max_length)
    return out, letter_ids, stats


def tokenize_texts(
    examples: Sequence[ClassificationExample],
    tokenizer: PreTrainedTokenizerBase,
    labels: LabelSpace,
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
) -> tuple[list[Tokenized], TokenizeStats]:
    """Encoder inputs (with the tokenizer's special tokens) and class indices."""
    stats = TokenizeStats(examples=len(examples))
    out: list[Tokenized] = []
    for ex in examples:
        if ex.is_choice or ex.text is None:
            raise DataError(
                f"line {ex.line}: the encoder classifier reads {{'text', 'label'}} rows, not multiple choice"
            )
        ids = list(tokenizer(ex.text, add_special_tokens=True)["input_ids"])
        if len(ids) > max_length:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids = [*ids[: max_length - 1], ids[-1]]  # keep the closing special token ([SEP])
            stats.truncated += 1
        out.append(Tokenized(input_ids=ids, target=labels.index(ex.label, ex.line), line=ex.line))
        stats.tokens += len(ids)
        stats.target_tokens += 1
    stats.kept = len(out)
    _check_kept(stats, max_length)
    return out, stats


# ---- batches --------------------------------------------------------------------------------------------
def collate(batch: Sequence[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask (B, T), and labels (B, T) or target (B,) plus
    last_index (B,): the position of each row's last real token."""
    import torch

    T_max = max(len(x) for x in batch)
    B = len(batch)
    ids = torch.full((B, T_max), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T_max), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x.input_ids, dtype=torch.long)
        mask[i, : len(x)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if batch[0].labels is not None:
        labels = torch.full((B, T_max), IGNORE_INDEX, dtype=torch.long)
        for i, x in enumerate(batch):
            assert x.labels is not None
            labels[i, : len(x)] = torch.tensor(x.labels, dtype=torch.long)
        out["labels"] = labels
    else:
        out["target"] = torch.tensor([int(x.target or 0) for x in batch], dtype=torch.long)
        out["last_index"] = torch.tensor([len(x) - 1 for x in batch], dtype=torch.long)
    return out


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a permutation seeded by (seed, epoch), cut into batches (the last
    one may be short). Deterministic, so a resumed run finds its place from (epoch, batch index) alone."""
    import torch

    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def count_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum().item())
