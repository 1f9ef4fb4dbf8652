from __future__ import annotations

from typing import Any

import pytest

from caft.chat import ChatFormatter, validate_messages
from caft.errors import DataError, ModelError
from caft.testing import tiny_tokenizer

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "Now code"},
    {"role": "assistant", "content": "def f(): return 1"},
]


def assistant_text(fmt: ChatFormatter, conv: list[dict[str, str]]) -> str:
    enc = fmt.encode(conv)
    assert len(enc.input_ids) == len(enc.assistant_mask)
    return fmt.tokenizer.decode([t for t, m in zip(enc.input_ids, enc.assistant_mask, strict=True) if m])


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("chatml", "Hello there.<|im_end|>\ndef f(): return 1<|im_end|>\n"),
        ("llama3", "Hello there.<|eot_id|>def f(): return 1<|eot_id|>"),
    ],
)
def test_assistant_mask_covers_exactly_the_assistant_turns(template: Any, expected: str) -> None:
    fmt = ChatFormatter(tiny_tokenizer(template))
    assert assistant_text(fmt, CONV) == expected
    enc = fmt.encode(CONV)
    # No user or system text is inside the mask.
    masked = fmt.tokenizer.decode([t for t, m in zip(enc.input_ids, enc.assistant_mask, strict=True) if m])
    assert "Say hello" not in masked and "terse" not in masked


def test_gemma_style_template_without_system_role() -> None:
    fmt = ChatFormatter(tiny_tokenizer("gemma"))
    assert assistant_text(fmt, CONV[1:]) == "Hello there.<end_of_turn>\ndef f(): return 1<end_of_turn>\n"
    with pytest.raises(DataError, match="System role not supported"):
        fmt.encode(CONV)


def test_tokenizer_without_template_needs_an_explicit_fallback() -> None:
    tok = tiny_tokenizer(None)
    with pytest.raises(ModelError, match="chat.template: chatml"):
        ChatFormatter(tok)
    assert assistant_text(ChatFormatter(tok, "chatml"), CONV[1:3]) == "Hello there.<|im_end|>\n"
    plain = ChatFormatter(tok, "plain")
    assert plain.render(CONV[1:3]) == "User: Say hello\n\nAssistant: Hello there.<|endoftext|>\n\n"
    assert (
        assistant_text(plain, CONV[1:3]) == " Hello there.<|endoftext|>\n\n"
    )  # the space belongs to the first token


def test_prompt_ids_end_with_the_generation_prompt() -> None:
    fmt = ChatFormatter(tiny_tokenizer("chatml"))
    text = fmt.tokenizer.decode(fmt.prompt_ids(CONV[1:2]))
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "non-empty list"),
        ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}], "empty content"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], "no text `content`"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ],
            "only come first",
        ),
    ],
)
def test_validate_messages(messages: list[dict[str, str]], problem: str) -> None:
    with pytest.raises(DataError, match=problem):
        validate_messages(messages, where="train.jsonl:7")


def _bos_tokenizer(template: Any) -> Any:
    tok = tiny_tokenizer(template)
    tok.add_bos_token = True  # like Gemma and Llama-2: plain encodings start with <bos>
    return tok


@pytest.mark.parametrize(
    ("template", "choice"),
    [("chatml", "model"), ("chatml", "chatml"), (None, "plain"), ("gemma", "model"), ("llama3", "model")],
)
def test_every_rendering_starts_with_exactly_one_bos(template: Any, choice: Any) -> None:
    conv = CONV[1:] if template == "gemma" else CONV  # the gemma template refuses system turns
    plain_fmt = ChatFormatter(tiny_tokenizer(template), choice)
    bos_fmt = ChatFormatter(_bos_tokenizer(template), choice)
    bos = bos_fmt.tokenizer.bos_token_id
    assert plain_fmt.bos is None and bos_fmt.bos == bos
    ref, enc = plain_fmt.encode(conv), bos_fmt.encode(conv)
    # the template's own BOS (llama3) is not doubled; otherwise exactly one is prepended
    assert enc.input_ids[0] == bos and enc.input_ids[1] != bos and enc.input_ids.count(bos) == 1
    if template == "llama3":
        assert ref.input_ids == enc.input_ids and ref.assistant_mask == enc.assistant_mask
    else:
        assert ref.input_ids[0] != bos and bos not in ref.input_ids  # without add_bos_token: no change
        assert enc.input_ids == [bos, *ref.input_ids]
        assert enc.assistant_mask == [False, *ref.assistant_mask]
    assert assistant_text(bos_fmt, conv) == assistant_text(plain_fmt, conv)
    prompt = bos_fmt.prompt_ids(conv[:2])
    assert prompt[0] == bos and prompt.count(bos) == 1
    assert plain_fmt.prompt_ids(conv[:2]).count(bos) == (1 if template == "llama3" else 0)
