"""Anthropic messages through `AsyncAnthropic().messages.create`.

anthropic >= 1.0 has no `temperature`/`top_p` parameters on `create`, so they travel in `extra_body` (the
API still accepts them). There is no `seed`. Structured output is a forced tool whose input schema is the
response model; the tool's input becomes the reply text. Anthropic returns no logprobs: the capability flag
says so and the client refuses such requests before sending them.
"""

from __future__ import annotations

import json
from typing import Any

from caft.llm import structured
from caft.llm.sdk_errors import api_key_from_env, map_exception, missing_sdk
from caft.llm.types import (
    Capabilities,
    GenerateConfig,
    GenerateResult,
    Message,
    Provider,
    RetryableError,
    ToolCall,
    ToolSpec,
    Usage,
)


def to_anthropic_messages(messages: list[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """(system prompt, turns). Tool results become user turns with `tool_result` blocks; consecutive
    turns of one role are merged, as the API wants user and assistant to alternate."""
    system = [m.content for m in messages if m.role == "system"]
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            continue
        if m.role == "tool":
            role = "user"
            blocks: list[dict[str, Any]] = [
                {"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": m.content}
            ]
        elif m.role == "assistant":
            role = "assistant"
            blocks = [{"type": "text", "text": m.content}] if m.content else []
            blocks += [
                {"type": "tool_use", "id": tc.id, "name": tc.name, "input": tc.arguments}
                for tc in m.tool_calls
            ]
        else:
            role = "user"
            blocks = [{"type": "text", "text": m.content}]
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return ("\n\n".join(system) if system else None), turns


def to_anthropic_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools]


def anthropic_tool_choice(choice: str) -> dict[str, Any]:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    return {"type": "tool", "name": choice}


class AnthropicProvider(Provider):
    """`anthropic/<model>`."""

    name = "anthropic"
    capabilities = Capabilities(logprobs=False, tools=True, structured_output="tool")

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 600.0,
        default_headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(model)
        try:
            import anthropic
        except ImportError as e:
            raise missing_sdk("anthropic", self.name) from e
        self._sdk = anthropic
        self.base_url = base_url
        self.key_env = api_key_env or "ANTHROPIC_API_KEY"
        key = api_key_from_env(self.key_env, self.model_id)
        self._client = anthropic.AsyncAnthropic(
            api_key=key,
            base_url=base_url,
            timeout=timeout_s,
            max_retries=0,
            default_headers=default_headers,
        )

    def build_request(
        self, messages: list[Message], config: GenerateConfig
    ) -> tuple[dict[str, Any], str | None]:
        """(keyword arguments for `messages.create`, name of the forced structured-output tool or None)."""
        system, turns = to_anthropic_messages(messages)
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": config.max_tokens, "messages": turns}
        if system:
            kwargs["system"] = system
        if config.stop:
            kwargs["stop_sequences"] = list(config.stop)
        tools = to_anthropic_tools(config.tools)
        forced: str | None = None
        if config.response_model is not None:
            forced = structured.schema_name(config.response_model)
            tools.append(
                {
                    "name": forced,
                    "description": "Give your answer by calling this tool; its input is the answer.",
                    "input_schema": structured.json_schema(config.response_model),
                }
            )
            kwargs["tool_choice"] = {"type": "tool", "name": forced}
        elif config.tools:
            kwargs["tool_choice"] = anthropic_tool_choice(config.tool_choice)
        if tools:
            kwargs["tools"] = tools
        body: dict[str, Any] = {"temperature": config.temperature}
        if config.top_p is not None:
            body["top_p"] = config.top_p
        body.update(config.extra)
        kwargs["extra_body"] = body
        return kwargs, forced

    async def generate(self, messages: list[Message], config: GenerateConfig) -> GenerateResult:
        kwargs, forced = self.build_request(messages, config)
        request = {k: v for k, v in kwargs.items() if k != "extra_body"} | kwargs["extra_body"]
        try:
            response = await self._client.messages.create(**kwargs)
        except Exception as e:
            raise map_exception(e, self._sdk, self.model_id, self.key_env) from e
        try:
            return self._parse(response, request, forced)
        except (AttributeError, IndexError, KeyError, TypeError) as e:
            raise RetryableError(f"{self.model_id}: malformed reply from the server: {e}") from e

    # -- for provider batches (caft.llm.batch): the same body and the same parsing as `generate` --------

    @property
    def sdk_client(self) -> Any:
        """The SDK's `AsyncAnthropic` client (message batches endpoints)."""
        return self._client

    def request_body(self, messages: list[Message], config: GenerateConfig) -> dict[str, Any]:
        """The JSON body `generate` sends for this request (`extra_body` fields merged in), as a batch
        request's `params`."""
        kwargs, _ = self.build_request(messages, config)
        return {k: v for k, v in kwargs.items() if k != "extra_body"} | kwargs["extra_body"]

    def parse_body(
        self, body: dict[str, Any], messages: list[Message], config: GenerateConfig
    ) -> GenerateResult:
        """A message JSON body (e.g. a succeeded batch result's) parsed exactly as `generate` parses one."""
        _, forced = self.build_request(messages, config)
        try:
            message = self._sdk.types.Message.model_validate(body)
            return self._parse(message, self.request_body(messages, config), forced)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise RetryableError(f"{self.model_id}: malformed reply in a batch result: {e}") from e

    def _parse(self, response: Any, request: dict[str, Any], forced: str | None) -> GenerateResult:
        texts: list[str] = []
        tool_calls: list[ToolCall] = []
        structured_text: str | None = None
        for block in response.content or []:
            if block.type == "text":
                texts.append(block.text)
            elif block.type == "tool_use":
                args = block.input if isinstance(block.input, dict) else {}
                err = None if isinstance(block.input, dict) else "tool input is not a JSON object"
                if forced is not None and block.name == forced:
                    structured_text = json.dumps(block.input, ensure_ascii=False)
                else:
                    tool_calls.append(ToolCall(id=block.id, name=block.name, arguments=args, parse_error=err))
        u = response.usage
        input_tokens = (
            (u.input_tokens or 0) + (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)
        )
        return GenerateResult(
            text=structured_text if structured_text is not None else "".join(texts),
            tool_calls=tool_calls,
            usage=Usage(input_tokens=input_tokens, output_tokens=u.output_tokens or 0),
            finish_reason=response.stop_reason,
            model=response.model or self.model,
            raw_request=request,
            raw_response=response.model_dump(mode="json", exclude_none=True),
        )

    async def aclose(self) -> None:
        await self._client.close()
