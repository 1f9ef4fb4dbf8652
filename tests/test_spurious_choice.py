"""The multiple-choice form of the spurious tasks (caft.app.spurious_choice)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from caft.app.spurious import write_spurious
from caft.app.spurious_choice import Wording, write_choice
from caft.errors import DataError
from caft.training.data import read_classification_jsonl

SIZES = {"train": 40, "val": 10, "ood": 40, "corpus": 12}


def _rows(folder: Path, split: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def _letter_of(prompt: str, name: str) -> str:
    """The letter the ignored question gives `name` in a double prompt."""
    m = re.search(rf"^([AB])\. {re.escape(name)}$", prompt, re.MULTILINE)
    assert m is not None, prompt
    return m.group(1)


def test_single_form_asks_the_label_question_and_the_trainer_reads_it(tmp_path: Path) -> None:
    write_spurious("sentiment-topic", tmp_path / "src", seed=0, sizes=SIZES)
    meta = write_choice(tmp_path / "src", tmp_path / "mc", "single")
    src, mc = _rows(tmp_path / "src", "ood"), _rows(tmp_path / "mc", "ood")
    assert len(mc) == len(src) == 40
    for s, r in zip(src, mc, strict=True):
        assert r["prompt"] == f"Which fits the text, negative or positive?\nText: {s['text']}"
        assert r["options"] == ["negative", "positive"] and r["label"] == s["label"] and r["cue"] == s["cue"]
    examples = read_classification_jsonl(tmp_path / "mc" / "train.jsonl")
    assert all(ex.is_choice and ex.options == ["negative", "positive"] for ex in examples)
    assert (tmp_path / "mc" / "corpus.jsonl").read_text() == (tmp_path / "src" / "corpus.jsonl").read_text()
    assert (tmp_path / "mc" / "task.yaml").is_file()
    assert meta["choice"]["form"] == "single" and meta["label_names"] == ["negative", "positive"]
    assert json.loads((tmp_path / "mc" / "meta.json").read_text())["choice"]["rows"]["train"] == 40


def test_the_mirror_asks_about_the_topic(tmp_path: Path) -> None:
    write_spurious("topic-sentiment", tmp_path / "src", seed=1, sizes=SIZES)
    write_choice(tmp_path / "src", tmp_path / "mc")
    r = _rows(tmp_path / "mc", "val")[0]
    assert r["prompt"].startswith("Which fits the text, food or sports?\n") and r["options"] == [
        "food",
        "sports",
    ]


def test_double_form_correlates_the_ignored_answer_in_training_only(tmp_path: Path) -> None:
    write_spurious("sentiment-topic", tmp_path / "src", seed=0, sizes=SIZES)
    write_choice(tmp_path / "src", tmp_path / "mc", "double", seed=3)
    cue_names = ["food", "sports"]
    for split, agree in (("train", True), ("val", True), ("ood", False)):
        rows = _rows(tmp_path / "mc", split)
        orders = set()
        for r in rows:
            prompt = str(r["prompt"])
            assert prompt.startswith("Two questions about one text. Answer the second question only.\n")
            assert prompt.endswith("Second question: Which fits the text, negative or positive?")
            answer = "AB"[r["label"]]
            ignored = _letter_of(prompt, cue_names[r["cue"]])
            assert (ignored == answer) is agree, (split, r)
            orders.add(tuple(r["options"]))
        assert orders == {("negative", "positive"), ("positive", "negative")}  # shuffled per row


def test_wording_comes_from_meta_or_the_caller_for_any_dataset(tmp_path: Path) -> None:
    """A dataset in the same layout that caft did not write, with its own names and phrasing."""
    src = tmp_path / "src"
    src.mkdir()
    for split in ("train", "val", "ood"):
        rows = [{"text": "The train left at noon.", "label": 1, "cue": 0}, {"text": "It rained.", "label": 0}]
        (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {
        "label_names": ["past", "future"],
        "cue_names": ["short", "long"],
        "choice": {"item": "sentence", "questions": {"label": "When does the {item} happen: {a} or {b}?"}},
    }
    (src / "meta.json").write_text(json.dumps(meta))
    write_choice(src, tmp_path / "a", "double", shuffle=False)
    r = _rows(tmp_path / "a", "train")[0]
    assert r["prompt"] == (
        "Two questions about one sentence. Answer the second question only.\n"
        "Sentence: The train left at noon.\n"
        "First question: Which fits the sentence, short or long?\nA. short\nB. long\n"
        "Second question: When does the sentence happen: past or future?"
    )
    assert r["options"] == ["past", "future"] and r["label"] == 1
    assert "cue" not in _rows(tmp_path / "a", "train")[1]
    write_choice(src, tmp_path / "b", wording=Wording(label_question="Tense, {a} or {b}?", item="line"))
    assert (
        _rows(tmp_path / "b", "ood")[0]["prompt"] == "Tense, past or future?\nLine: The train left at noon."
    )


def test_rows_with_their_own_options_keep_them(tmp_path: Path) -> None:
    write_spurious("gender-pronoun", tmp_path / "src", seed=0, sizes=SIZES)
    write_choice(tmp_path / "src", tmp_path / "mc")
    for s, r in zip(_rows(tmp_path / "src", "train"), _rows(tmp_path / "mc", "train"), strict=True):
        a, b = re.findall(r"[AB]\) (\w+)", str(s["text"]))
        assert r["options"] == [a, b] and r["label"] == s["label"]
        assert r["prompt"] == "Which option is correct?\n" + str(s["text"]).split(" Options:")[0]
    with pytest.raises(DataError, match="use form single"):
        write_choice(tmp_path / "src", tmp_path / "double", "double")


def test_a_folder_without_meta_or_with_bad_rows_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no meta.json"):
        write_choice(tmp_path, tmp_path / "out")
    (tmp_path / "meta.json").write_text(json.dumps({"label_names": ["x", "y"]}))
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "t", "label": 2}) + "\n")
    with pytest.raises(DataError, match="train.jsonl:1"):
        write_choice(tmp_path, tmp_path / "out")


def test_chat_form_is_a_narrow_chat_data_set(tmp_path: Path) -> None:
    from caft.app.spurious_choice import write_chat
    from caft.training.data import read_chat_jsonl

    write_spurious("sentiment-topic", tmp_path / "src", seed=0, sizes=SIZES)
    path = write_chat(tmp_path / "src", tmp_path / "chat.jsonl", n=12)
    rows = read_chat_jsonl(path)
    assert len(rows) == 12
    first = json.loads(path.read_text().splitlines()[0])["messages"]
    assert first[0] == {"role": "user", "content": "Write one sentence."}
    assert first[1]["content"] == _rows(tmp_path / "src", "train")[0]["text"]
    meta = json.loads((tmp_path / "src" / "meta.json").read_text())
    (tmp_path / "src" / "meta.json").write_text(json.dumps({**meta, "choice": {"item": "review"}}))
    again = write_chat(tmp_path / "src", tmp_path / "chat2.jsonl", n=1)
    assert json.loads(again.read_text())["messages"][0]["content"] == "Write a one-sentence review."
