"""The scripted pieces of the fake LLM wire server (`caft.testing.fakellm`): replies, faults, recorded requests
and the rules that match one to the other."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

FaultKind = Literal["429", "500", "503", "400", "401", "403", "404", "hang", "malformed", "truncated"]


@dataclass
class Reply:
    """One scripted answer. ``json`` is an object reply: its dump is the OpenAI content, and the input of a
    forced Anthropic tool. ``tool_calls`` items are ``{"name": ..., "arguments": dict | raw str}``.
    ``top_logprobs``: one ``{token: logprob}`` table (one position) or a list of them (one per position); when
    absent and logprobs are asked for, each space-separated piece of the text is a position with logprob 0."""

    text: str = ""
    json: Any = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    top_logprobs: dict[str, float] | list[dict[str, float]] | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    latency_s: float | None = None
    """Overrides the server's latency for this reply."""
    refusal: str | None = None
    """OpenAI only: the message's `refusal` (its content is then null)."""

    @property
    def content(self) -> str:
        return json.dumps(self.json) if self.json is not None else self.text


@dataclass
class Fault:
    kind: FaultKind
    retry_after: float | None = None
    hang_s: float = 30.0
    message: str = ""


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    api: Literal["openai", "anthropic"]
    time: float

    @property
    def prompt(self) -> str:
        """Every message's text (Anthropic's `system` included), newline-joined."""
        parts: list[str] = []
        system = self.body.get("system")
        if isinstance(system, str):
            parts.append(system)
        elif isinstance(system, list):
            parts += [b.get("text", "") for b in system if isinstance(b, dict)]
        for m in self.body.get("messages", []):
            content = m.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                for block in content:
                    if isinstance(block, dict):
                        value = block.get("text", block.get("content", ""))
                        parts.append(value if isinstance(value, str) else json.dumps(value))
        return "\n".join(parts)


ReplyLike = Union[str, Reply, Fault]
Responder = Union[ReplyLike, Callable[[RecordedRequest], ReplyLike]]
Matcher = Union[str, "re.Pattern[str]", Callable[[RecordedRequest], bool], None]


def _matches(matcher: Matcher, req: RecordedRequest) -> bool:
    if matcher is None:
        return True
    if isinstance(matcher, str):
        return matcher in req.prompt
    if isinstance(matcher, re.Pattern):
        return matcher.search(req.prompt) is not None
    return bool(matcher(req))


@dataclass
class _Rule:
    matcher: Matcher
    reply: Responder
    times: int | None


def _words(text: str) -> int:
    return max(1, len(text.split()))
