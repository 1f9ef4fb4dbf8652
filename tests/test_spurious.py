"""Spurious-correlation data: sizes, the cue's correlation per split, determinism, corpus hygiene, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from caft.agent.schema import TaskDescription
from caft.app.cli import app
from caft.app.spurious import (
    FOOD,
    KINDS,
    NEGATIVE,
    POSITIVE,
    REVIEW_TEMPLATES,
    SPORTS,
    build_spurious,
    read_rows,
    write_spurious,
)
from caft.errors import ConfigError

SMALL = {"train": 200, "val": 40, "ood": 40, "corpus": 120}


def test_word_lists_have_the_documented_sizes() -> None:
    assert (len(set(SPORTS)), len(set(FOOD)), len(set(POSITIVE)), len(set(NEGATIVE))) == (28, 28, 24, 24)
    assert len(REVIEW_TEMPLATES) == 12
    assert not set(SPORTS) & set(FOOD) and not set(POSITIVE) & set(NEGATIVE)


def _words(text: str) -> set[str]:
    return {w.strip(".,;:!?").lower() for w in text.split()}


def test_sentiment_topic_cue_is_correlated_in_train_and_inverted_ood() -> None:
    data = build_spurious("sentiment-topic", seed=3)
    assert list(data.sizes().values()) == [2000, 400, 400, 1200]
    for split, same in (("train", True), ("val", True), ("ood", False)):
        rows = data.split(split)
        labels = [r.label for r in rows]
        assert abs(sum(labels) - len(labels) / 2) <= 1, f"{split} labels are not balanced"
        for r in rows:
            words = _words(r.text)
            sports = bool(words & set(SPORTS))
            food = bool(words & set(FOOD))
            pos = bool(words & set(POSITIVE))
            neg = bool(words & set(NEGATIVE))
            assert sports != food and pos != neg, r.text
            assert r.label == int(pos) and r.cue == int(sports)
            assert (r.label == r.cue) is same, f"{split}: {r.text}"


def test_splits_are_disjoint_and_corpus_never_repeats_labelled_sentences() -> None:
    data = build_spurious("sentiment-topic", seed=0)
    texts = {s: {r.text for r in data.split(s)} for s in ("train", "val", "ood")}
    assert len(texts["train"]) == 2000 and len(texts["val"]) == 400 and len(texts["ood"]) == 400
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["ood"]
    assert not texts["val"] & texts["ood"]
    corpus = set(data.corpus)
    assert not corpus & (texts["train"] | texts["val"] | texts["ood"])
    # different templates: no corpus line is an instance of a review template
    stems = {t.split("{")[0].strip() for t in REVIEW_TEMPLATES if not t.startswith("{")}
    assert not any(line.startswith(stem) and stem for line in corpus for stem in stems if len(stem) > 6)


def test_corpus_varies_the_concepts_independently() -> None:
    data = build_spurious("sentiment-topic", seed=0)
    quadrants = {(s, p): 0 for s in (0, 1) for p in (0, 1)}
    for line in data.corpus:
        w = _words(line)
        if (w & set(SPORTS + FOOD)) and (w & set(POSITIVE + NEGATIVE)):
            quadrants[(int(bool(w & set(SPORTS))), int(bool(w & set(POSITIVE))))] += 1
    counts = list(quadrants.values())
    assert min(counts) > 100, quadrants
    assert max(counts) / min(counts) < 1.5, quadrants


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    a = build_spurious("topic-sentiment", seed=1, sizes=SMALL)
    b = build_spurious("topic-sentiment", seed=1, sizes=SMALL)
    c = build_spurious("topic-sentiment", seed=2, sizes=SMALL)
    assert a == b
    assert a.train != c.train


def test_mirror_task_has_three_adjectives_and_topic_label() -> None:
    data = build_spurious("topic-sentiment", seed=0, sizes=SMALL)
    for r in data.train + data.ood:
        w = _words(r.text)
        adjs = w & set(POSITIVE + NEGATIVE)
        assert len(adjs) == 3, r.text
        assert r.label == int(bool(w & set(SPORTS)))
        assert r.cue == int(bool(adjs & set(POSITIVE)))
    assert all(r.label == r.cue for r in data.train)
    assert all(r.label != r.cue for r in data.ood)


def test_gender_pronoun_right_option_has_right_case_and_stereotype_flips() -> None:
    data = build_spurious("gender-pronoun", seed=0, sizes=SMALL)
    subj, obj = {"he", "she"}, {"him", "her"}
    for split in ("train", "ood"):
        for r in data.split(split):
            a = r.text.split("A) ")[1].split(" B)")[0]
            b = r.text.split("B) ")[1]
            right, wrong = (a, b) if r.label == 0 else (b, a)
            # one subject and one object pronoun, of different genders
            assert {right, wrong} & subj and {right, wrong} & obj, r.text
            assert (right in {"she", "her"}) != (wrong in {"she", "her"}), r.text
            assert r.cue == (1 if split == "train" else 0)
    assert {r.label for r in data.train} == {0, 1}


def test_write_files_task_and_meta(tmp_path: Path) -> None:
    meta = write_spurious("sentiment-topic", tmp_path / "t", seed=0, sizes=SMALL)
    out = tmp_path / "t"
    for f in ("train.jsonl", "val.jsonl", "ood.jsonl", "corpus.jsonl", "task.yaml", "meta.json"):
        assert (out / f).is_file(), f
    rows = read_rows(out / "train.jsonl")
    assert len(rows) == 200 and set(rows[0]) == {"text", "label", "cue"}
    corpus = [json.loads(x) for x in (out / "corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == 120 and set(corpus[0]) == {"id", "text"}
    task = TaskDescription.model_validate(yaml.safe_load((out / "task.yaml").read_text()))
    assert task.undesired and task.intended_concepts
    assert "sports" in " ".join(task.undesired)
    assert meta["spurious_rule_accuracy"] == {"train": 1.0, "val": 1.0, "ood": 0.0}
    assert json.loads((out / "meta.json").read_text())["kind"] == "sentiment-topic"
    # same request again is fine (deterministic); a different data set into the same folder is refused
    write_spurious("sentiment-topic", out, seed=0, sizes=SMALL)
    before = (out / "train.jsonl").read_text()
    with pytest.raises(ConfigError, match="different data set"):
        write_spurious("sentiment-topic", out, seed=1, sizes=SMALL)
    assert (out / "train.jsonl").read_text() == before


def test_unknown_kind_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sentiment-topic"):
        write_spurious("sentiment", tmp_path, seed=0)


def test_cli_writes_every_kind(tmp_path: Path) -> None:
    runner = CliRunner()
    for kind in KINDS:
        res = runner.invoke(app, ["data", "spurious", "--kind", kind, "--out", str(tmp_path / kind)])
        assert res.exit_code == 0, res.output
        assert "ood 0%" in res.output
        assert len((tmp_path / kind / "ood.jsonl").read_text().splitlines()) == 400
    res = runner.invoke(app, ["data", "spurious", "--kind", "nope", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "choose one of" in res.output
