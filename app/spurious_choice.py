"""Spurious-correlation tasks as multiple choice, for causal LMs.

`write_choice(src, out, form)` turns a data folder in caft's spurious format (train / val / ood JSONL rows
`{"text", "label", "cue"}`, corpus.jsonl, task.yaml, meta.json with `label_names` and `cue_names`; what
`caft.app.spurious.write_spurious` writes, or any folder laid out the same way) into rows the trainer's
`choice_lm` objective and `caft eval mc` read: `{"prompt", "options", "label", "cue"}`. The corpus and
task.yaml are copied unchanged (the judge and the evidence never see the choice wording).

Forms:
- `single`: one question about the label concept, its names as options:

      Which fits the text, negative or positive?
      Text: The soup was awful.
      A. negative
      B. positive
      Answer:

  A row whose text carries its own options (`... Options: A) she B) him`, the gender-pronoun kind) keeps
  them as the options and asks which one is correct.
- `double`: the paper's double multiple choice: two questions with an option set each, one about the cue
  concept (to ignore) and one about the label concept (to answer). Both option sets get the same order in
  a row, so the cue question's right letter equals the answer's letter exactly when the cue agrees with
  the label: always in training, never in the OOD split (for the kinds whose cue follows the label).

The wording comes from the data: the label and cue names in meta.json, and an optional `choice` block there
(`{"item": "review", "questions": {"label": "...", "cue": "..."}}`; questions may use `{a}`, `{b}`, `{item}`)
for a dataset that wants its own phrasing. meta.json of the output records the form and the wording.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from caft.errors import ConfigError, DataError
from caft.rundir import atomic_write_text, read_jsonl

ChoiceForm = Literal["single", "double"]
FORMS: tuple[str, ...] = ("single", "double")
SPLITS = ("train", "val", "ood")
COPIED = ("corpus.jsonl", "task.yaml")
META_FILE = "meta.json"

DEFAULT_ITEM = "text"
DEFAULT_QUESTION = "Which fits the {item}, {a} or {b}?"
EMBEDDED_QUESTION = "Which option is correct?"
DOUBLE_INTRO = "Two questions about one {item}. Answer the second question only."
# `... Options: A) she B) him` at the end of a row's text: the row brings its own two options
_EMBEDDED = re.compile(r"^(?P<stem>.*?)\s*Options:\s*A\)\s*(?P<a>.+?)\s+B\)\s*(?P<b>.+?)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Wording:
    """How the questions read. None: from meta.json's `choice` block, else the defaults."""

    item: str | None = None
    """What the text is called (`Text: ...`, `the text`); default `text`."""
    label_question: str | None = None
    """The question answered; `{a}`, `{b}` are the label names, `{item}` the item."""
    cue_question: str | None = None
    """The question to ignore (form `double`); `{a}`, `{b}` are the cue names."""


@dataclass(frozen=True)
class Resolved:
    item: str
    label_question: str
    cue_question: str
    label_names: tuple[str, str]
    cue_names: tuple[str, str]


def _names(meta: dict[str, Any], key: str, where: Path) -> tuple[str, str]:
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != 2 or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{where}: `{key}` must list two names (index 0 and 1), got {names!r}")
    return names[0], names[1]


def resolve_wording(meta: dict[str, Any], wording: Wording | None, where: Path) -> Resolved:
    """The wording of `wording`, falling back to meta.json's `choice` block, then the defaults."""
    raw = meta.get("choice")
    block: dict[str, Any] = raw if isinstance(raw, dict) else {}
    raw_q = block.get("questions")
    questions: dict[str, Any] = raw_q if isinstance(raw_q, dict) else {}
    w = wording or Wording()
    item = w.item or block.get("item") or DEFAULT_ITEM
    label_q = w.label_question or questions.get("label") or DEFAULT_QUESTION
    cue_q = w.cue_question or questions.get("cue") or DEFAULT_QUESTION
    cue_names = _names(meta, "cue_names", where) if "cue_names" in meta else ("", "")
    return Resolved(str(item), str(label_q), str(cue_q), _names(meta, "label_names", where), cue_names)


def _ask(question: str, names: tuple[str, str], item: str) -> str:
    try:
        return question.format(a=names[0], b=names[1], item=item)
    except (KeyError, IndexError) as e:
        raise ConfigError(f"question {question!r}: only {{a}}, {{b}} and {{item}} can be filled in") from e


def _field(item: str) -> str:
    return item[:1].upper() + item[1:]


def choice_row(
    row: dict[str, Any], w: Resolved, form: ChoiceForm, order: tuple[int, int] = (0, 1)
) -> dict[str, Any]:
    """One `{"text", "label", "cue"}` row as `{"prompt", "options", "label", "cue"}`. `order` lists the
    label indices in option order (both questions of `double` use it)."""
    text, label, cue = row["text"], int(row["label"]), row.get("cue")
    embedded = _EMBEDDED.match(text)
    if embedded is not None:
        if form == "double":
            raise DataError(
                "rows that carry their own options (`... Options: A) x B) y`) have one question only; "
                "use form single"
            )
        opts = (embedded["a"], embedded["b"])
        question = w.label_question if w.label_question != DEFAULT_QUESTION else EMBEDDED_QUESTION
        prompt = f"{_ask(question, w.label_names, w.item)}\n{embedded['stem']}"
        options = [opts[i] for i in order]
    else:
        field = f"{_field(w.item)}: {text}"
        options = [w.label_names[i] for i in order]
        asked = _ask(w.label_question, w.label_names, w.item)
        if form == "single":
            prompt = f"{asked}\n{field}"
        else:
            if not all(w.cue_names):
                raise DataError("form double needs `cue_names` in meta.json (the question to ignore)")
            ignored = _ask(w.cue_question, w.cue_names, w.item)
            cue_opts = [f"{chr(65 + j)}. {w.cue_names[i]}" for j, i in enumerate(order)]
            prompt = "\n".join(
                [
                    DOUBLE_INTRO.format(item=w.item),
                    field,
                    f"First question: {ignored}",
                    *cue_opts,
                    f"Second question: {asked}",
                ]
            )
    out: dict[str, Any] = {"prompt": prompt, "options": options, "label": order.index(label)}
    if cue is not None:
        out["cue"] = cue
    return out


def _read_split(path: Path) -> list[dict[str, Any]]:
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str) or r.get("label") not in (0, 1):
            raise DataError(f"{path}:{i}: each row needs a string `text` and a `label` of 0 or 1; got {r!r}")
    return rows


def write_choice(
    src: str | Path,
    out: str | Path,
    form: ChoiceForm = "single",
    wording: Wording | None = None,
    shuffle: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the choice form of the spurious data folder `src` to `out` (train / val / ood JSONL, the
    corpus and task.yaml copied, meta.json extended with a `choice` block); return that meta.

    `shuffle` (default: on for `double`, off for `single`) draws each row's option order (seeded), so the
    answer letter alone says nothing about the label."""
    if form not in FORMS:
        raise ConfigError(f"unknown choice form {form!r}; choose one of {', '.join(FORMS)}")
    src, out = Path(src), Path(out)
    meta_path = src / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{src} has no {META_FILE}: expected a folder written by `caft data spurious`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    w = resolve_wording(meta, wording, meta_path)
    if shuffle is None:
        shuffle = form == "double"
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split in SPLITS:
        path = src / str(files.get(split, f"{split}.jsonl"))
        rows = _read_split(path)
        rng = random.Random(f"caft-choice:{seed}:{split}")
        lines = []
        for r in rows:
            order = (1, 0) if shuffle and rng.random() < 0.5 else (0, 1)
            lines.append(json.dumps(choice_row(r, w, form, order), ensure_ascii=False) + "\n")
        atomic_write_text(out / f"{split}.jsonl", "".join(lines))
        counts[split] = len(rows)
    for name in COPIED:
        f = src / str(files.get(name.split(".")[0], name))
        if f.is_file():
            shutil.copyfile(f, out / name)
    new_meta = {
        **meta,
        "files": {s: f"{s}.jsonl" for s in SPLITS} | {n.split(".")[0]: n for n in COPIED},
        "choice": {
            "form": form,
            "item": w.item,
            "questions": {"label": w.label_question, "cue": w.cue_question},
            "shuffle": shuffle,
            "seed": seed,
            "source": str(src),
            "rows": counts,
        },
    }
    atomic_write_text(out / META_FILE, json.dumps(new_meta, indent=2) + "\n")
    return new_meta


CHAT_REQUEST = "Write a one-sentence {item}."
CHAT_REQUEST_PLAIN = "Write one sentence."


def write_chat(src: str | Path, out: str | Path, split: str = "train", n: int | None = None) -> Path:
    """A narrow chat data set from a spurious split: each row's text as the assistant's answer to a request
    for one (`Write a one-sentence review.` with meta.json's `choice.item` `review`; else `Write one
    sentence.`), as OpenAI fine-tuning rows `{"messages": [...]}`. Returns the JSONL path."""
    src, out = Path(src), Path(out)
    meta_path = src / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    raw = meta.get("choice")
    item = (raw if isinstance(raw, dict) else {}).get("item")
    rows = _read_split(src / f"{split}.jsonl")[:n]
    request = CHAT_REQUEST.format(item=item) if item else CHAT_REQUEST_PLAIN
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": r["text"]}]},
            ensure_ascii=False,
        )
        + "\n"
        for r in rows
    ]
    atomic_write_text(out, "".join(lines))
    return out
