"""Chat formatting: conversations -> token ids + an assistant-token mask.

Loss (training) and analysis (activation differences) happen on assistant tokens. The mask is computed
by rendering prefixes of the conversation with the chat template, so it works for templates that have no
`{% generation %}` markers:

    prefix_i = render(messages[:i], add_generation_prompt=True)   # everything before assistant turn i
    upto_i   = render(messages[:i + 1])                           # ... including assistant turn i
    chars [len(prefix_i), len(upto_i)) of the full rendering are assistant text (content + end-of-turn)

and tokens whose character offsets overlap those spans are assistant tokens. A template for which the
prefixes are not prefixes of the full rendering falls back to locating each assistant content string;
if that fails too, the error says so.

Tokenizers without a chat template need an explicit choice (`chat.template: chatml` or `plain`).

Token sequences start as the model was trained: when the tokenizer puts a BOS in front of plain text
(Gemma's `<bos>`, Llama's `<s>`), every encoding here starts with exactly one BOS, whether the template
writes it into the text (Llama-3's `<|begin_of_text|>`) or not (chatml, plain, Gemma GGUF without a
template). Gemma-3 without its `<bos>` has roughly twice the loss on assistant tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from caft.errors import DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}System: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

TemplateChoice = Literal["model", "chatml", "plain"]


def validate_messages(
    messages: Any, where: str = "conversation", require_assistant: bool = True
) -> list[dict[str, str]]:
    """Check an OpenAI-format message list; a `DataError` names `where` and the problem."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{'role', 'content'}} objects")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: message {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(
                f"{where}: message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})"
            )
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has no text `content`")
        if not content.strip():
            raise DataError(f"{where}: message {i} ({role}) has empty content")
        if role == "system" and i != 0:
            raise DataError(f"{where}: a system message may only come first (found at position {i})")
        out.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn (nothing to train or analyse on)")
    return out


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id the tokenizer puts in front of plain text (`add_bos_token`, or a BOS at the start of an
    ordinary encoding), or None when it adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    if getattr(tokenizer, "add_bos_token", False):
        return int(bos)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def with_bos(ids: list[int], bos: int | None) -> list[int]:
    """`ids` starting with `bos` exactly once (unchanged when `bos` is None or already first)."""
    if bos is None or (ids and ids[0] == bos):
        return ids
    return [bos, *ids]


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    assistant_mask: list[bool]
    text: str

    def __len__(self) -> int:
        return len(self.input_ids)


class ChatFormatter:
    """Renders conversations with a tokenizer's chat template (or an explicitly chosen fallback)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: TemplateChoice = "model") -> None:
        self.tokenizer = tokenizer
        if template == "model":
            if not getattr(tokenizer, "chat_template", None):
                name = getattr(tokenizer, "name_or_path", "this tokenizer")
                raise ModelError(
                    f"{name} has no chat template. Choose a fallback format explicitly: set "
                    "`chat.template: chatml` (or `plain`) in the model config, or `--set model.chat.template=chatml`"
                )
            self._template: str | None = None
        elif template == "chatml":
            self._template = CHATML_TEMPLATE
        elif template == "plain":
            self._template = PLAIN_TEMPLATE
        else:
            raise ModelError(f"unknown chat template choice {template!r} (model | chatml | plain)")
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError(
                "assistant masks need a fast tokenizer (character offsets); load it with use_fast=True"
            )
        self.bos = leading_bos(tokenizer)

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if self._template is not None:
            kwargs["chat_template"] = self._template
        try:
            text = self.tokenizer.apply_chat_template([dict(m) for m in messages], **kwargs)
        except Exception as e:  # jinja raises its own TemplateError for e.g. an unsupported system role
            raise DataError(f"the chat template rejected this conversation: {e}") from e
        if not isinstance(text, str):
            raise ModelError("apply_chat_template(tokenize=False) did not return text")
        return text

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a conversation ending with the generation prompt (for sampling a reply)."""
        text = self.render(messages, add_generation_prompt=True)
        ids: list[int] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return with_bos(ids, self.bos)

    def assistant_spans(self, messages: Sequence[Mapping[str, str]], full: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True) if i > 0 else ""
            upto = self.render(messages[: i + 1])
            if full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= cursor:
                start, end = len(prefix), len(upto)
            else:
                start = full.find(m["content"], cursor)
                if start < 0:
                    raise ModelError(
                        "cannot locate assistant turns in this chat template's output (it rewrites content); "
                        "choose `chat.template: chatml` or `plain` explicitly"
                    )
                end = start + len(m["content"])
            spans.append((start, end))
            cursor = end
        return spans

    def encode(self, messages: Sequence[Mapping[str, str]]) -> EncodedChat:
        """Token ids of the whole conversation and the mask of assistant tokens."""
        full = self.render(messages)
        spans = self.assistant_spans(messages, full)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
        mask = [e > s and any(s < b and e > a for a, b in spans) for (s, e) in offsets]
        if self.bos is not None and (not ids or ids[0] != self.bos):  # the template wrote none
            ids, mask = [self.bos, *ids], [False, *mask]
        return EncodedChat(input_ids=ids, assistant_mask=mask, text=full)
