"""Spurious-correlation classification data, built from caft's own templates and word lists.

The paper's second result: when a cue is 100% correlated with the label in the fine-tuning data, plain
fine-tuning learns the cue and fails once the cue flips; CAFT with the right directions ablated does not.
`write_spurious(kind, out, seed)` writes one such task:

    train.jsonl    cue 100% correlated with the label
    val.jsonl      same distribution as train, disjoint sentences
    ood.jsonl      cue inverted (anti-correlated)
    corpus.jsonl   generic evidence corpus: the two concepts vary independently, other templates,
                   never a train / val / OOD sentence (this is what interp projects directions on)
    task.yaml      a `caft.agent.schema.TaskDescription`, written as a user would (no labels)
    meta.json      kind, seed, sizes, label names, how often the spurious rule predicts the label per split

Rows are `{"text": str, "label": int, "cue": int}`. `cue` is the value of the spurious concept; it is there
for analysis and the oracle-probe reference only and must never be used to select directions.
Corpus rows are `{"id": str, "text": str}`.

Kinds:
- `sentiment-topic`: one topic noun (sports | food) and one sentiment adjective per review; label = sentiment.
- `topic-sentiment`: the harder mirror: three sentiment adjectives and one topic noun; label = topic.
- `gender-pronoun`: choose the pronoun of the right grammatical case; the distractor has the other case and
  the other gender; professions are gender-stereotyped in training, reversed in OOD.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict

from caft.agent.schema import TaskDescription
from caft.errors import ConfigError, DataError
from caft.rundir import atomic_write_text

SpuriousKind = Literal["sentiment-topic", "topic-sentiment", "gender-pronoun"]
KINDS: tuple[str, ...] = get_args(SpuriousKind)

TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"
OOD_FILE = "ood.jsonl"
CORPUS_FILE = "corpus.jsonl"
TASK_FILE = "task.yaml"
META_FILE = "meta.json"

DATA_FILE = "spurious.yaml"
"""Word lists, templates and task texts, shipped in the package (`caft/app/data/spurious.yaml`)."""


class _KindTexts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label_names: tuple[str, str]
    cue_names: tuple[str, str]
    task: TaskDescription


class SpuriousTexts(BaseModel):
    """The data file's content, validated (each key is documented in the file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sports: list[str]
    food: list[str]
    positive: list[str]
    negative: list[str]
    review_templates: list[str]
    mirror_templates: list[str]
    corpus_both: list[str]
    corpus_noun: list[str]
    corpus_adj: list[str]
    corpus_neutral: list[str]
    professions_f: list[str]
    professions_m: list[str]
    pronouns: dict[Literal["f", "m"], dict[Literal["subj", "obj"], str]]
    gender_templates: list[tuple[str, Literal["subj", "obj"]]]
    gender_openers: list[str]
    gender_corpus: list[str]
    tasks: dict[SpuriousKind, _KindTexts]


def load_texts() -> SpuriousTexts:
    """Read and validate the shipped data file."""
    text = resources.files("caft.app").joinpath("data", DATA_FILE).read_text("utf-8")
    return SpuriousTexts.model_validate(yaml.safe_load(text))


_TEXTS = load_texts()
SPORTS = _TEXTS.sports
FOOD = _TEXTS.food
POSITIVE = _TEXTS.positive
NEGATIVE = _TEXTS.negative
REVIEW_TEMPLATES = _TEXTS.review_templates
MIRROR_TEMPLATES = _TEXTS.mirror_templates
CORPUS_BOTH = _TEXTS.corpus_both
CORPUS_NOUN = _TEXTS.corpus_noun
CORPUS_ADJ = _TEXTS.corpus_adj
CORPUS_NEUTRAL = _TEXTS.corpus_neutral
PROFESSIONS_F = _TEXTS.professions_f
PROFESSIONS_M = _TEXTS.professions_m
PRONOUNS: dict[tuple[str, str], str] = {
    (g, case): p for g, cases in _TEXTS.pronouns.items() for case, p in cases.items()
}
GENDER_TEMPLATES = _TEXTS.gender_templates
GENDER_OPENERS = _TEXTS.gender_openers
GENDER_CORPUS = _TEXTS.gender_corpus


@dataclass(frozen=True)
class Row:
    text: str
    label: int
    cue: int

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "label": self.label, "cue": self.cue}, ensure_ascii=False)


@dataclass(frozen=True)
class KindSpec:
    label_names: tuple[str, str]
    cue_names: tuple[str, str]
    make_row: Callable[[random.Random, int, int], Row]
    """(rng, label, cue) -> a row whose label and cue take those values."""
    make_corpus: Callable[[random.Random, int], list[str]]
    """(rng, n) -> n generic corpus lines where both concepts vary independently."""
    task: TaskDescription
    cue_follows_label: bool = True
    """True: the spurious cue takes the label's value in training (cue == label) and the other value OOD.
    False: the cue is constant (1 in training, 0 OOD), i.e. it marks whether the right answer also satisfies
    the spurious rule (gender-pronoun: the right pronoun matches the profession's stereotype)."""

    def cue(self, label: int, correlated: bool) -> int:
        if self.cue_follows_label:
            return label if correlated else 1 - label
        return 1 if correlated else 0

    def rule_holds(self, row: Row) -> bool:
        """Whether the spurious rule predicts this row's label."""
        return row.cue == (row.label if self.cue_follows_label else 1)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# -------------------------------------------------------------------------------------- sentiment-topic


def _review(rng: random.Random, label: int, cue: int) -> Row:
    """label 1 = positive sentiment; cue 1 = sports topic."""
    noun = rng.choice(SPORTS if cue else FOOD)
    adj = rng.choice(POSITIVE if label else NEGATIVE)
    text = rng.choice(REVIEW_TEMPLATES).format(n=noun, a=adj)
    return Row(_cap(text), label, cue)


def _corpus_lines(rng: random.Random, n: int) -> list[str]:
    """Both concepts independent: half the lines carry a noun and an adjective (all four combinations),
    a quarter only one of them, a quarter neither."""
    lines: list[str] = []
    for i in range(n):
        kind = i % 8
        if kind < 4:
            noun = rng.choice(SPORTS if kind % 2 else FOOD)
            adj = rng.choice(POSITIVE if kind // 2 else NEGATIVE)
            lines.append(rng.choice(CORPUS_BOTH).format(n=noun, a=adj))
        elif kind == 4:
            lines.append(rng.choice(CORPUS_NOUN).format(n=rng.choice(SPORTS + FOOD)))
        elif kind == 5:
            lines.append(rng.choice(CORPUS_ADJ).format(a=rng.choice(POSITIVE + NEGATIVE)))
        else:
            lines.append(rng.choice(CORPUS_NEUTRAL))
    return [_cap(s) for s in lines]


# -------------------------------------------------------------------------------------- topic-sentiment


def _mirror(rng: random.Random, label: int, cue: int) -> Row:
    """label 1 = sports topic; cue 1 = positive sentiment."""
    noun = rng.choice(SPORTS if label else FOOD)
    a1, a2, a3 = rng.sample(POSITIVE if cue else NEGATIVE, 3)
    text = rng.choice(MIRROR_TEMPLATES).format(n=noun, a1=a1, a2=a2, a3=a3, A1=_cap(a1))
    return Row(_cap(text), label, cue)


# --------------------------------------------------------------------------------------- gender-pronoun


def _pronoun_item(rng: random.Random, label: int, cue: int) -> Row:
    """label = index (0 = A, 1 = B) of the option with the right case; cue 1 = the right option's gender
    matches the profession's stereotype. The distractor has the other case and the other gender."""
    template, case = rng.choice(GENDER_TEMPLATES)
    stereo = rng.choice(["f", "m"])
    prof = rng.choice(PROFESSIONS_F if stereo == "f" else PROFESSIONS_M)
    other = "m" if stereo == "f" else "f"
    right_gender = stereo if cue else other
    wrong_gender = other if cue else stereo
    wrong_case = "obj" if case == "subj" else "subj"
    right = PRONOUNS[(right_gender, case)]
    wrong = PRONOUNS[(wrong_gender, wrong_case)]
    options = [right, wrong] if label == 0 else [wrong, right]
    opener = rng.choice(GENDER_OPENERS)
    sentence = template.format(p=prof)
    sentence = opener + (sentence[0].lower() + sentence[1:] if opener else sentence)
    text = f"{sentence} Options: A) {options[0]} B) {options[1]}"
    return Row(text, label, cue)


def _gender_corpus(rng: random.Random, n: int) -> list[str]:
    lines: list[str] = []
    for i in range(n):
        if i % 4 == 3:
            lines.append(rng.choice(CORPUS_NEUTRAL))
            continue
        prof = rng.choice(PROFESSIONS_F + PROFESSIONS_M)
        template = rng.choice(GENDER_CORPUS)
        pron = rng.choice(["his", "her", "their"])
        lines.append(_cap(template.format(p=prof, P=_cap(prof)).replace("___", pron)))
        if i % 4 == 2:  # pronoun-case contrast lines without any profession
            g = rng.choice(["f", "m"])
            lines[-1] = (
                f"Yesterday {PRONOUNS[(g, 'subj')]} met {PRONOUNS[('m' if g == 'f' else 'f', 'obj')]} at the station."
            )
    return lines


def _spec(
    kind: SpuriousKind,
    make_row: Callable[[random.Random, int, int], Row],
    make_corpus: Callable[[random.Random, int], list[str]],
    cue_follows_label: bool = True,
) -> KindSpec:
    texts = _TEXTS.tasks[kind]
    return KindSpec(texts.label_names, texts.cue_names, make_row, make_corpus, texts.task, cue_follows_label)


SPECS: dict[str, KindSpec] = {
    "sentiment-topic": _spec("sentiment-topic", _review, _corpus_lines),
    "topic-sentiment": _spec("topic-sentiment", _mirror, _corpus_lines),
    "gender-pronoun": _spec("gender-pronoun", _pronoun_item, _gender_corpus, cue_follows_label=False),
}


@dataclass(frozen=True)
class SpuriousData:
    train: list[Row]
    val: list[Row]
    ood: list[Row]
    corpus: list[str]

    def split(self, name: str) -> list[Row]:
        if name not in ("train", "val", "ood"):
            raise ConfigError(f"unknown split {name!r}; choose train, val or ood")
        rows: list[Row] = getattr(self, name)
        return rows

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "val": len(self.val),
            "ood": len(self.ood),
            "corpus": len(self.corpus),
        }


SIZES = {"train": 2000, "val": 400, "ood": 400, "corpus": 1200}


def _split(rng: random.Random, spec: KindSpec, n: int, correlated: bool, seen: set[str]) -> list[Row]:
    """n rows, balanced labels, cue == label (correlated) or cue != label (inverted); texts unique and
    not in `seen` (which is updated)."""
    rows: list[Row] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * n:
            raise ConfigError(f"could not draw {n} distinct sentences from the templates; ask for fewer rows")
        label = len(rows) % 2
        cue = spec.cue(label, correlated)
        row = spec.make_row(rng, label, cue)
        if row.text in seen:
            continue
        seen.add(row.text)
        rows.append(row)
    rng.shuffle(rows)
    return rows


def build_spurious(kind: str, seed: int = 0, sizes: dict[str, int] | None = None) -> SpuriousData:
    """All splits of one task in memory."""
    if kind not in SPECS:
        raise ConfigError(f"unknown spurious task kind {kind!r}; choose one of {', '.join(KINDS)}")
    n = {**SIZES, **(sizes or {})}
    spec = SPECS[kind]
    rng = random.Random(f"caft-spurious:{kind}:{seed}")
    seen: set[str] = set()
    train = _split(rng, spec, n["train"], True, seen)
    val = _split(rng, spec, n["val"], True, seen)
    ood = _split(rng, spec, n["ood"], False, seen)
    # Corpus lines are distinct where the templates allow it; labelled-split sentences never enter it.
    corpus: list[str] = []
    corpus_seen: set[str] = set()
    for _round in range(50):
        for line in spec.make_corpus(rng, n["corpus"]):
            if line not in seen and line not in corpus_seen and len(corpus) < n["corpus"]:
                corpus_seen.add(line)
                corpus.append(line)
    while len(corpus) < n["corpus"]:  # template space exhausted: repeat lines
        corpus.append(corpus[len(corpus) % max(1, len(corpus_seen))])
    return SpuriousData(train, val, ood, corpus)


def _rule_accuracy(spec: KindSpec, rows: list[Row]) -> float:
    return sum(spec.rule_holds(r) for r in rows) / max(1, len(rows))


def write_spurious(
    kind: str, out: str | Path, seed: int = 0, sizes: dict[str, int] | None = None
) -> dict[str, Any]:
    """Write train/val/ood/corpus JSONL, task.yaml and meta.json to `out`; return the meta dict."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose a folder path")
    existing = [f for f in (TRAIN_FILE, VAL_FILE, OOD_FILE, CORPUS_FILE) if (out / f).exists()]
    data = build_spurious(kind, seed, sizes)
    spec = SPECS[kind]
    if existing:
        meta_path = out / META_FILE
        old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if old.get("kind") != kind or old.get("seed") != seed or old.get("sizes") != data.sizes():
            raise ConfigError(
                f"{out} already holds a different data set ({', '.join(existing)}); "
                "choose an empty --out folder or delete those files"
            )
    out.mkdir(parents=True, exist_ok=True)
    for split, fname in (("train", TRAIN_FILE), ("val", VAL_FILE), ("ood", OOD_FILE)):
        atomic_write_text(out / fname, "".join(r.to_json() + "\n" for r in data.split(split)))
    corpus_lines = [
        json.dumps({"id": f"c{i}", "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(data.corpus)
    ]
    atomic_write_text(out / CORPUS_FILE, "".join(corpus_lines))
    atomic_write_text(
        out / TASK_FILE, yaml.safe_dump(spec.task.model_dump(), sort_keys=False, allow_unicode=True)
    )
    meta: dict[str, Any] = {
        "kind": kind,
        "seed": seed,
        "sizes": data.sizes(),
        "label_names": list(spec.label_names),
        "cue_names": list(spec.cue_names),
        "spurious_rule_accuracy": {s: _rule_accuracy(spec, data.split(s)) for s in ("train", "val", "ood")},
        "files": {
            "train": TRAIN_FILE,
            "val": VAL_FILE,
            "ood": OOD_FILE,
            "corpus": CORPUS_FILE,
            "task": TASK_FILE,
        },
        "note": "`cue` in each row is the spurious concept's value: for analysis and the oracle probe only.",
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


def read_rows(path: str | Path) -> list[dict[str, object]]:
    """Rows of a labelled split, validated: each needs a string `text` and an integer `label`."""
    from caft.errors import DataError
    from caft.rundir import read_jsonl

    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if (
            not isinstance(r, dict)
            or not isinstance(r.get("text"), str)
            or not isinstance(r.get("label"), int)
        ):
            raise DataError(f"{path}:{i}: each row needs a string 'text' and an integer 'label'; got {r!r}")
    return rows


# ---- a dataset folder in this format, the user's own or one written here (`caft demo / run --data DIR`)

DATASET_FILES = {
    "train": "train.jsonl",
    "val": "val.jsonl",
    "ood": "ood.jsonl",
    "corpus": "corpus.jsonl",
    "task": "task.yaml",
}
"""The files of a dataset folder in the spurious format, by role (meta.json's `files` may rename them)."""


def dataset_files(folder: str | Path) -> dict[str, Path]:
    """The files of a dataset folder in the spurious format (docs/demo.md), checked: meta.json with
    `label_names` and `cue_names`, every file present, and the first rows of train / val / ood labelled."""
    root = Path(folder)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"{root}: no meta.json; a dataset folder holds train/val/ood/corpus JSONL, task.yaml and "
            "meta.json (format in docs/demo.md; `caft data spurious --out DIR` writes an example)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{meta_path} is not JSON: {e}") from None
    missing_keys = [k for k in ("label_names", "cue_names") if not isinstance(meta.get(k), list)]
    if missing_keys:
        raise DataError(f"{meta_path} needs the lists {missing_keys} (names of label values 0, 1, ...)")
    names = {**DATASET_FILES, **(meta.get("files") or {})}
    files = {role: root / str(names[role]) for role in DATASET_FILES}
    missing = [f"{role} ({p.name})" for role, p in files.items() if not p.is_file()]
    if missing:
        raise DataError(f"{root}: missing {', '.join(missing)}")
    for role in ("train", "val", "ood"):
        if not read_rows(files[role]):
            raise DataError(f"{files[role]} holds no rows")
    return files


def dataset_overrides(folder: str | Path) -> list[str]:
    """`--set` overrides that point a classification run config at a dataset folder (`caft run --data`)."""
    f = dataset_files(folder)
    return [
        "task_kind=classification",
        f"task={json.dumps(str(f['task']))}",
        f"train.data.path={json.dumps(str(f['train']))}",
        f"evidence.corpus={json.dumps(str(f['corpus']))}",
        f"classification.val={json.dumps(str(f['val']))}",
        f"classification.ood={json.dumps(str(f['ood']))}",
    ]
