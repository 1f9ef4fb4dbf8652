"""A scripted provider for tests and dry runs: no network, no SDK, same contract as the real ones.

Replies come from a list, an iterator, or a callable `(messages, config) -> reply`. A reply is one of

- `str`: the reply text;
- `GenerateResult`: returned as is (with `model` filled in);
- `dict`: if every key is a `GenerateResult` field (plus the shortcut `top_logprobs`), the fields of the
  result, e.g. `{"text": "7", "top_logprobs": {"7": -0.1, "8": -2.4}}`; any other dict is a JSON object
  reply (its `json.dumps` becomes the text), handy for structured output;
- an `LLMError` instance: raised, to script failures (e.g. `RetryableError("busy")` then a reply).

Running out of scripted replies raises `ScriptExhaustedError`: a test never gets a silent default.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Union

from caft.llm.types import (
    Capabilities,
    GenerateConfig,
    GenerateResult,
    LLMError,
    Message,
    PositionLogprobs,
    Provider,
    ScriptExhaustedError,
    TokenLogprob,
    ToolCall,
    Usage,
)

MockReply = Union[str, GenerateResult, dict[str, Any], LLMError]
MockScript = Union[
    Iterable[MockReply],
    Iterator[MockReply],
    Callable[[list[Message], GenerateConfig], MockReply],
]

_RESULT_FIELDS = set(GenerateResult.model_fields) | {"top_logprobs"}


def _count_tokens(text: str) -> int:
    """A crude token count (words) so that accounting code sees non-zero numbers."""
    return len(text.split())


def _top_to_positions(top: dict[str, float] | list[dict[str, float]]) -> list[PositionLogprobs]:
    tables = [top] if isinstance(top, dict) else list(top)
    positions = []
    for table in tables:
        ranked = sorted(table.items(), key=lambda kv: kv[1], reverse=True)
        if not ranked:
            raise ValueError("a scripted top_logprobs table is empty")
        positions.append(
            PositionLogprobs(
                token=ranked[0][0],
                logprob=ranked[0][1],
                top=[TokenLogprob(token=t, logprob=lp) for t, lp in ranked],
            )
        )
    return positions


class MockProvider(Provider):
    """Scripted replies (see the module docstring). `calls` records every `(messages, config)` received.

    Capabilities default to everything (logprobs, tools, native structured output) so that callers'
    code paths can be tested; pass `logprobs=False` to act like a provider without logprobs (Anthropic).
    When logprobs are requested but a reply scripts none, each whitespace-separated piece of the text
    becomes one position with probability 1."""

    name = "mock"

    def __init__(
        self,
        model: str = "mock",
        replies: MockScript | None = None,
        *,
        logprobs: bool = True,
        tools: bool = True,
        capabilities: Capabilities | None = None,
    ) -> None:
        super().__init__(model)
        self.capabilities = capabilities or Capabilities(
            logprobs=logprobs, tools=tools, structured_output="native"
        )
        self.calls: list[tuple[list[Message], GenerateConfig]] = []
        self._fn: Callable[[list[Message], GenerateConfig], MockReply] | None = None
        self._it: Iterator[MockReply] | None = None
        if replies is None:
            self._it = iter(())
        elif callable(replies):
            self._fn = replies
        else:
            self._it = iter(replies)

    def extend(self, replies: Iterable[MockReply]) -> None:
        """Queue more scripted replies after the current ones."""
        if self._it is None:
            raise TypeError("this mock answers through a callable; it has no reply queue to extend")
        self._it = itertools.chain(self._it, iter(replies))

    async def generate(self, messages: list[Message], config: GenerateConfig) -> GenerateResult:
        self.calls.append((list(messages), config))
        if self._fn is not None:
            reply = self._fn(messages, config)
        else:
            assert self._it is not None
            try:
                reply = next(self._it)
            except StopIteration:
                raise ScriptExhaustedError(
                    f"mock/{self.model} ran out of scripted replies after {len(self.calls) - 1} call(s); "
                    "script more replies (MockProvider(replies=[...]) or .extend([...]))"
                ) from None
        if isinstance(reply, LLMError):
            raise reply
        result = self._to_result(reply, config)
        prompt = " ".join(m.content for m in messages)
        usage = result.usage
        if usage.input_tokens == 0 and usage.output_tokens == 0:
            usage = Usage(
                input_tokens=_count_tokens(prompt), output_tokens=max(1, _count_tokens(result.text))
            )
        raw_request = {
            "model": self.model,
            "messages": [m.model_dump(mode="json", exclude_defaults=True) for m in messages],
            "config": config.model_dump(mode="json", exclude_defaults=True),
        }
        return result.model_copy(
            update={
                "model": result.model or self.model,
                "usage": usage,
                "finish_reason": result.finish_reason or ("tool_calls" if result.tool_calls else "stop"),
                "raw_request": result.raw_request or raw_request,
                "raw_response": result.raw_response or {"text": result.text},
            }
        )

    def _to_result(self, reply: MockReply, config: GenerateConfig) -> GenerateResult:
        if isinstance(reply, GenerateResult):
            result = reply
        elif isinstance(reply, str):
            result = GenerateResult(text=reply)
        elif isinstance(reply, dict):
            if reply and set(reply) <= _RESULT_FIELDS:
                fields = dict(reply)
                top = fields.pop("top_logprobs", None)
                fields.setdefault("text", "")
                fields["tool_calls"] = [
                    tc if isinstance(tc, ToolCall) else ToolCall.model_validate(tc)
                    for tc in fields.get("tool_calls", [])
                ]
                result = GenerateResult.model_validate(fields)
                if top is not None:
                    result = result.model_copy(update={"logprobs": _top_to_positions(top)})
            else:
                result = GenerateResult(text=json.dumps(reply, ensure_ascii=False))
        else:
            raise TypeError(f"a mock reply must be str, dict, GenerateResult or LLMError, not {type(reply)}")
        if config.logprobs and result.logprobs is None:
            pieces = result.text.split() or [result.text]
            result = result.model_copy(
                update={
                    "logprobs": [
                        PositionLogprobs(token=p, logprob=0.0, top=[TokenLogprob(token=p, logprob=0.0)])
                        for p in pieces
                    ]
                }
            )
        return result
