"""Training data: readers (line-numbered errors, --skip-invalid counts), tokenization, collation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from caft.chat import ChatFormatter
from caft.errors import DataError
from caft.training.config import build_train_config, preset
from caft.training.data import (
    IGNORE_INDEX,
    ChatExample,
    ClassificationExample,
    LabelSpace,
    ReadReport,
    batch_order,
    choice_prompt,
    collate,
    letter_token_ids,
    read_chat_jsonl,
    read_classification_jsonl,
    split_holdout,
    tokenize_chat,
    tokenize_choice,
    tokenize_texts,
)

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


def _write(path: Path, rows: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BAD_CHAT = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"prompt": "x"}, "no `messages` field"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "x"}, GOOD["messages"][1]]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}, GOOD["messages"][1]]}, "empty content"),
]


@pytest.mark.parametrize(("row", "problem"), BAD_CHAT)
def test_bad_chat_row_names_line_and_problem(tmp_path: Path, row: Any, problem: str) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError) as err:
        read_chat_jsonl(path)
    msg = str(err.value)
    assert "d.jsonl:3:" in msg and problem in msg and "--skip-invalid" in msg


def test_skip_invalid_counts_and_keeps_good_rows(tmp_path: Path) -> None:
    rows: list[Any] = [GOOD]
    rows += [r for r, _ in BAD_CHAT]
    rows += ["", GOOD]
    path = _write(tmp_path / "d.jsonl", rows)
    rep = ReadReport()
    got = read_chat_jsonl(path, skip_invalid=True, report=rep)
    assert [ex.line for ex in got] == [1, len(rows)]
    assert rep.rows == 8 and rep.kept == 2 and len(rep.skipped) == 6
    assert [line for line, _ in rep.skipped] == [2, 3, 4, 5, 6, 7]
    assert "unknown role" in rep.skipped[4][1]
    assert rep.to_json()["skipped"] == 6


def test_all_invalid_or_empty_or_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="all 2 rows were invalid"):
        read_chat_jsonl(_write(tmp_path / "a.jsonl", ["{", "[]"]), skip_invalid=True)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        read_chat_jsonl(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_chat_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_chat_jsonl(tmp_path / "b.jsonl")


def test_classification_rows(tmp_path: Path) -> None:
    rows: list[Any] = [
        {"text": "good film", "label": "pos"},
        {"prompt": "Which?", "options": ["cat", "dog"], "label": 1},
        {"prompt": "Which?", "options": ["cat", "dog"], "label": "cat"},
    ]
    got = read_classification_jsonl(_write(tmp_path / "c.jsonl", rows))
    assert got[0].text == "good film" and got[0].label == "pos" and not got[0].is_choice
    assert got[1].label == 1 and got[2].label == 0 and got[2].options == ["cat", "dog"]
    bad = [
        ({"text": "x"}, "no `label`"),
        ({"text": "x", "label": True}, "integer or a string"),
        ({"text": "", "label": 1}, "non-empty `text`"),
        ({"prompt": "q", "options": ["a"], "label": 0}, "at least two"),
        ({"prompt": "q", "options": ["a", "b"], "label": 2}, "out of range"),
        ({"prompt": "q", "options": ["a", "b"], "label": "c"}, "not one of the options"),
        ({"options": ["a", "b"], "label": 0}, "non-empty `prompt`"),
    ]
    for row, problem in bad:
        with pytest.raises(DataError, match=problem):
            read_classification_jsonl(_write(tmp_path / "x.jsonl", [row]))


def test_label_space() -> None:
    ex = [ClassificationExample(label="pos", text="a"), ClassificationExample(label="neg", text="b")]
    space = LabelSpace.infer(ex)
    assert space.names == ["neg", "pos"] and space.index("pos") == 1
    ints = [ClassificationExample(label=2, text="a"), ClassificationExample(label=0, text="b")]
    assert LabelSpace.infer(ints).names == ["0", "1", "2"]
    with pytest.raises(DataError, match="mix integers and strings"):
        LabelSpace.infer([ex[0], ints[0]])
    with pytest.raises(DataError, match="not one of"):
        space.index("meh", line=7)
    assert LabelSpace.infer(ex, names=["pos", "neg"]).index("pos") == 0


def test_tokenize_chat_masks_assistant_tokens_only(tiny_tok: Any) -> None:
    fmt = ChatFormatter(tiny_tok, "model")
    ex = ChatExample(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "What is your wish?"},
            {"role": "assistant", "content": "A quick buck."},
        ],
        line=1,
    )
    out, stats = tokenize_chat([ex], fmt, max_length=512)
    (item,) = out
    assert item.labels is not None
    target = [t for t, lab in zip(item.input_ids, item.labels, strict=True) if lab != IGNORE_INDEX]
    decoded = tiny_tok.decode(target)
    assert "A quick buck." in decoded and "wish" not in decoded and "brief" not in decoded
    assert stats.kept == 1 and stats.target_tokens == len(target) - (item.labels[0] != IGNORE_INDEX)


def test_tokenize_chat_truncate_and_drop_counts(tiny_tok: Any) -> None:
    fmt = ChatFormatter(tiny_tok, "model")
    long_user = {"role": "user", "content": "word " * 200}
    short = ChatExample(GOOD["messages"], line=1)
    long_ex = ChatExample([long_user, {"role": "assistant", "content": "ok then"}], line=2)
    long_answer = ChatExample(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes " * 200}], 3
    )
    n_short = len(fmt.encode(short.messages))
    out, stats = tokenize_chat(
        [short, long_ex, long_answer], fmt, max_length=n_short + 10, overlong="truncate"
    )
    # the long prompt leaves no assistant token after truncation -> dropped; the long answer is cut
    assert stats.truncated == 2 and stats.dropped_no_target == 1 and stats.kept == 2
    assert [x.line for x in out] == [1, 3] and len(out[1]) == n_short + 10
    out, stats = tokenize_chat([short, long_ex, long_answer], fmt, max_length=n_short + 10, overlong="drop")
    assert stats.dropped_overlong == 2 and stats.kept == 1 and stats.truncated == 0
    with pytest.raises(DataError, match="no examples left"):
        tokenize_chat([long_ex], fmt, max_length=8, overlong="drop")


def test_choice_tokenization_and_letters(tiny_tok: Any) -> None:
    ids, space = letter_token_ids(tiny_tok, 2)
    assert len(ids) == 2 and ids[0] != ids[1]
    for i, letter in enumerate("AB"):
        assert tiny_tok.decode([ids[i]]).strip() == letter
    ex = ClassificationExample(label=1, prompt="Pick one", options=["red", "blue"], line=4)
    text = choice_prompt(ex, LabelSpace(["A", "B"]), space)
    assert text.startswith("Pick one\nA. red\nB. blue\nAnswer:")
    out, letters, stats = tokenize_choice([ex], tiny_tok, LabelSpace(["A", "B"]), max_length=512)
    assert out[0].target == 1 and letters == ids and stats.kept == 1
    # truncation keeps the end of the prompt (options and "Answer:")
    out, _, stats = tokenize_choice([ex], tiny_tok, LabelSpace(["A", "B"]), max_length=6)
    assert len(out[0]) == 6 and stats.truncated == 1
    assert tiny_tok.decode(out[0].input_ids).endswith(text[-3:])


def test_tokenize_texts_rejects_choice_rows(tiny_tok: Any) -> None:
    space = LabelSpace(["neg", "pos"])
    out, _ = tokenize_texts([ClassificationExample(label="pos", text="great fun")], tiny_tok, space, 64)
    assert out[0].target == 1
    with pytest.raises(DataError, match="not multiple choice"):
        tokenize_texts([ClassificationExample(label=0, prompt="q", options=["a", "b"])], tiny_tok, space, 64)


def test_collate_and_order() -> None:
    from caft.training.data import Tokenized

    batch = collate(
        [Tokenized([5, 6, 7], labels=[-100, 6, 7]), Tokenized([8, 9], labels=[-100, 9])], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    cls = collate([Tokenized([5, 6, 7], target=1), Tokenized([8], target=0)], pad_id=0)
    assert cls["target"].tolist() == [1, 0] and cls["last_index"].tolist() == [2, 0]
    assert batch_order(10, 4, seed=1, epoch=0) == batch_order(10, 4, seed=1, epoch=0)
    assert batch_order(10, 4, seed=1, epoch=0) != batch_order(10, 4, seed=1, epoch=1)
    order = batch_order(10, 4, seed=1, epoch=0)
    assert [len(b) for b in order] == [4, 4, 2] and sorted(i for b in order for i in b) == list(range(10))
    assert isinstance(batch["input_ids"], torch.Tensor)


def test_split_holdout() -> None:
    train, held = split_holdout(list(range(20)), 0.25, seed=0)
    assert len(held) == 5 and sorted(train + held) == list(range(20))
    assert split_holdout(list(range(20)), 0.25, seed=0) == (train, held)
    assert split_holdout([1, 2], 0.0, 0) == ([1, 2], [])


def test_presets_and_config_layers(tmp_path: Path) -> None:
    em = build_train_config("em")
    assert (em.lora.r, em.lora.alpha, em.lora.rslora, em.optim.lr) == (32, 64, True, 1e-5)
    assert em.optim.batch_size * em.optim.grad_accum == 16 and em.optim.warmup_steps == 5
    sp = build_train_config("spurious")
    assert sp.method == "full" and sp.optim.betas == (0.9, 0.95) and sp.optim.warmup_ratio == 0.5
    assert sp.objective == "choice_lm" and sp.optim.lr == 5e-6
    (tmp_path / "c.yaml").write_text("train:\n  optim:\n    lr: 0.001\nmodel:\n  name_or_path: m\n")
    cfg = build_train_config("em", str(tmp_path / "c.yaml"), overrides=["optim.grad_accum=2"])
    assert cfg.optim.lr == 0.001 and cfg.optim.grad_accum == 2 and cfg.lora.r == 32
    assert cfg.model is not None and cfg.model.name_or_path == "m"
    assert preset("em") is not preset("em")
    from caft.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown preset"):
        build_train_config("nope")
    with pytest.raises(ConfigError, match="warmup_steps or warmup_ratio"):
        build_train_config("em", overrides=["optim.warmup_ratio=0.1"])
    with pytest.raises(ConfigError, match=r"ablation\.mode"):
        build_train_config(None, overrides=["ablation.mode=zero"])


def test_choice_prompts_start_with_bos_when_the_tokenizer_adds_one(tiny_tok: Any) -> None:
    from caft.testing import tiny_tokenizer

    tok = tiny_tokenizer("chatml")
    tok.add_bos_token = True
    bos = tok.bos_token_id
    ex = ClassificationExample(label=1, prompt="Which is right?", options=["no", "yes"])
    plain, _, _ = tokenize_choice([ex], tiny_tok, LabelSpace(["A", "B"]), max_length=512)
    out, _, _ = tokenize_choice([ex], tok, LabelSpace(["A", "B"]), max_length=512)
    assert out[0].input_ids == [bos, *plain[0].input_ids] and bos not in plain[0].input_ids
    # truncation cuts the start of the prompt but keeps the BOS first
    cut, _, stats = tokenize_choice([ex], tok, LabelSpace(["A", "B"]), max_length=6)
    assert stats.truncated == 1 and len(cut[0]) == 6
    assert cut[0].input_ids == [bos, *plain[0].input_ids[-5:]]
