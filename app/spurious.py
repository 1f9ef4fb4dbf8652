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
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from caft.agent.schema import TaskDescription
from caft.errors import ConfigError
from caft.rundir import atomic_write_text

SpuriousKind = Literal["sentiment-topic", "topic-sentiment", "gender-pronoun"]
KINDS: tuple[str, ...] = get_args(SpuriousKind)

TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"
OOD_FILE = "ood.jsonl"
CORPUS_FILE = "corpus.jsonl"
TASK_FILE = "task.yaml"
META_FILE = "meta.json"

# ---------------------------------------------------------------------------------------------- word lists

SPORTS = [
    "football", "soccer", "tennis", "basketball", "baseball", "hockey", "golf", "rugby", "cricket",
    "volleyball", "boxing", "wrestling", "swimming", "cycling", "skiing", "surfing", "marathon", "match",
    "tournament", "stadium", "referee", "goalkeeper", "playoff", "championship", "racket", "skating",
    "archery", "badminton",
]  # fmt: skip
FOOD = [
    "pasta", "pizza", "soup", "bread", "salad", "burger", "sandwich", "steak", "sushi", "cheese",
    "chocolate", "cake", "curry", "noodles", "rice", "pancake", "taco", "omelette", "lasagna", "dumpling",
    "pie", "cookie", "risotto", "burrito", "bagel", "waffle", "muffin", "stew",
]  # fmt: skip
POSITIVE = [
    "wonderful", "great", "excellent", "fantastic", "delightful", "superb", "brilliant", "amazing",
    "lovely", "enjoyable", "marvelous", "terrific", "outstanding", "charming", "pleasant", "splendid",
    "impressive", "fabulous", "magnificent", "stunning", "perfect", "beautiful", "exciting", "satisfying",
]  # fmt: skip
NEGATIVE = [
    "terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "bad", "poor", "mediocre",
    "dull", "unpleasant", "miserable", "lousy", "pathetic", "disgusting", "annoying", "tedious",
    "atrocious", "bland", "frustrating", "awkward", "weak", "ugly", "painful",
]  # fmt: skip

# Example words a user would write into task.yaml's `concept_words`: a third of each list above, so
# the minimal pairs the evidence stage builds from them never see most of the training words.
EXAMPLE_WORDS = {
    "sentiment": {
        "positive": ["wonderful", "great", "excellent", "fantastic", "amazing", "lovely", "brilliant", "perfect"],
        "negative": ["terrible", "awful", "horrible", "bad", "poor", "boring", "dreadful", "disappointing"],
    },
    "topic": {
        "sports": ["football", "soccer", "tennis", "basketball", "baseball", "hockey", "golf", "match"],
        "food": ["pasta", "pizza", "soup", "bread", "salad", "burger", "steak", "cake"],
    },
}  # fmt: skip

# Review templates (train / val / OOD): {n} = topic noun, {a} = sentiment adjective.
REVIEW_TEMPLATES = [
    "The {n} was {a}.",
    "I thought the {n} was {a}.",
    "Honestly, the {n} today was {a}.",
    "What a {a} {n} that was.",
    "My friends agreed the {n} was {a}.",
    "Last night's {n} felt {a} to me.",
    "This {n} is simply {a}.",
    "Everyone said the {n} was {a}, and I agree.",
    "We found the {n} {a}.",
    "It was a {a} {n}, no doubt.",
    "The whole {n} seemed {a} from start to finish.",
    "In my opinion this {n} was {a}.",
]
# Mirror task: {n} = topic noun, {a1} {a2} {a3} = three sentiment adjectives of the same polarity.
MIRROR_TEMPLATES = [
    "The {n} was {a1}, {a2} and {a3}.",
    "A {a1}, {a2}, {a3} {n}.",
    "I found the {n} {a1}, {a2}, even {a3}.",
    "{A1} and {a2}: the {n} was {a3}.",
    "This {n} was {a1}; {a2}, {a3} really.",
    "What a {a1} {n}, so {a2} and {a3}.",
    "The {n} felt {a1}, then {a2}, finally {a3}.",
    "Our {n} was {a1} and {a2}, honestly {a3}.",
    "{A1}, {a2} and {a3} describe the {n}.",
    "Everyone called the {n} {a1}, {a2} and {a3}.",
    "It was a {a1} {n}, {a2} and {a3} too.",
    "My verdict on the {n}: {a1}, {a2}, {a3}.",
]
# Evidence corpus templates: different wording, concepts independent, plus one-concept and neutral lines.
CORPUS_BOTH = [
    "She wrote a {a} note about the {n}.",
    "People keep calling the {n} {a} these days.",
    "A {a} story about {n} appeared in the paper.",
    "He described his {n} as {a} on the radio.",
    "Some say {n} is {a}, others disagree.",
    "The guide listed the {n} under {a} experiences.",
]
CORPUS_NOUN = [
    "They talked about {n} for an hour.",
    "The article mentions {n} twice.",
    "Next week there is more {n} on the schedule.",
    "A photo of the {n} hung on the wall.",
]
CORPUS_ADJ = [
    "The weather was {a} all week.",
    "Her reply sounded {a}.",
    "It turned out to be a {a} afternoon.",
    "The train ride felt {a}.",
]
CORPUS_NEUTRAL = [
    "The meeting starts at nine in the small room.",
    "He parked the car near the old library.",
    "The report has twelve pages and three tables.",
    "She opened the window and looked at the street.",
    "Our office moved to the second floor last year.",
    "The bus was late because of road works.",
    "They painted the fence green on Saturday.",
    "A letter arrived from the city council.",
    "The museum closes early on Mondays.",
    "He counted the boxes twice before leaving.",
    "The river runs past the north side of town.",
    "Please bring a pen and your ticket.",
]

# Gender-pronoun task: (profession, stereotyped gender); sentences need a subject or object pronoun.
PROFESSIONS_F = [
    "nurse", "secretary", "receptionist", "hairdresser", "librarian", "nanny", "dancer", "housekeeper",
    "midwife", "florist", "stylist", "babysitter",
]  # fmt: skip
PROFESSIONS_M = [
    "mechanic", "carpenter", "plumber", "electrician", "firefighter", "pilot", "engineer", "surgeon",
    "builder", "farmer", "soldier", "janitor",
]  # fmt: skip
PRONOUNS = {("f", "subj"): "she", ("f", "obj"): "her", ("m", "subj"): "he", ("m", "obj"): "him"}
# {p} = the profession; ___ marks where the pronoun goes; the case the blank needs
GENDER_TEMPLATES: list[tuple[str, Literal["subj", "obj"]]] = [
    ("The {p} said that ___ would be late.", "subj"),
    ("The {p} was tired, so ___ went home early.", "subj"),
    ("When the {p} arrived, ___ sat down.", "subj"),
    ("The {p} smiled because ___ had finished the work.", "subj"),
    ("The {p} thinks ___ deserves a break.", "subj"),
    ("The {p} knew ___ had made a mistake.", "subj"),
    ("We thanked the {p} and paid ___ right away.", "obj"),
    ("The manager called the {p} and told ___ the news.", "obj"),
    ("Nobody helped the {p}, so we helped ___.", "obj"),
    ("The {p} waved, and the children waved back at ___.", "obj"),
    ("I saw the {p} and gave ___ the keys.", "obj"),
    ("Tell the {p} that we will meet ___ later.", "obj"),
]
# Openers multiply the few (template, profession) pairs into enough distinct items.
GENDER_OPENERS = [
    "", "Yesterday, ", "Later, ", "As usual, ", "In the end, ", "This morning, ", "At noon, ",
    "After lunch, ", "On Friday, ", "Once again, ",
]  # fmt: skip
GENDER_CORPUS = [
    "The {p} walked to work this morning.",
    "A {p} spoke at the school assembly.",
    "My cousin is a {p} in a small town.",
    "The {p} and ___ friend ate lunch together.",
    "Someone asked the {p} for directions.",
    "{P} jobs are advertised every week.",
]


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


SPECS: dict[str, KindSpec] = {
    "sentiment-topic": KindSpec(
        label_names=("negative", "positive"),
        cue_names=("food", "sports"),
        make_row=_review,
        make_corpus=_corpus_lines,
        task=TaskDescription(
            name="sentiment-topic",
            intended="Classify whether a short review expresses a positive or a negative opinion.",
            undesired=[
                "what the review is about: whether its subject is sports or food",
                "topic words such as games, athletes, dishes and meals",
            ],
            intended_concepts=[
                "positive or negative sentiment",
                "praise versus criticism",
                "opinion adjectives like good, bad, wonderful, awful",
            ],
            notes=(
                "In our training data every positive review happens to be about sports and every negative one "
                "about food; we want a classifier that reads the opinion, not the subject."
            ),
            concept_words=EXAMPLE_WORDS,
        ),
    ),
    "topic-sentiment": KindSpec(
        label_names=("food", "sports"),
        cue_names=("negative", "positive"),
        make_row=_mirror,
        make_corpus=_corpus_lines,
        task=TaskDescription(
            name="topic-sentiment",
            intended="Classify whether a short review is about sports or about food.",
            undesired=[
                "the opinion expressed: whether the review is positive or negative",
                "sentiment words such as wonderful, terrible, great, awful",
            ],
            intended_concepts=[
                "sports: games, athletes, matches",
                "food: dishes, meals, cooking",
                "the subject of the review",
            ],
            notes=(
                "In our training data every sports review happens to be positive and every food review "
                "negative; we want a classifier that reads the subject, not the opinion."
            ),
            concept_words=EXAMPLE_WORDS,
        ),
    ),
    "gender-pronoun": KindSpec(
        label_names=("A", "B"),
        cue_names=("anti-stereotyped", "stereotyped"),
        make_row=_pronoun_item,
        make_corpus=_gender_corpus,
        task=TaskDescription(
            name="gender-pronoun",
            intended="Pick the pronoun with the grammatically correct case (subject or object) for the blank.",
            undesired=[
                "gender: whether a pronoun or a profession is associated with women or men",
                "gender stereotypes about professions",
            ],
            intended_concepts=[
                "grammatical case: subject pronoun versus object pronoun",
                "sentence structure and syntax",
            ],
            notes=(
                "In our training data the correct pronoun always matches the gender stereotype of the "
                "profession; the choice must depend on grammar only."
            ),
        ),
        cue_follows_label=False,
    ),
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
