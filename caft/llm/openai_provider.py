"""OpenAI chat completions, and any server that speaks the same API (vLLM, Ollama, gateways).

The SDK is imported when a provider is built, and its own retries are switched off (`max_retries=0`): the
client's retry policy is the only one, so the server sees exactly the attempts we count.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from caft.llm import structured
from caft.llm.sdk_errors import api_key_from_env, map_exception, missing_sdk
from caft.llm.types import (
    Capabilities,
    FatalError,
    GenerateConfig,
    GenerateResult,
    Message,
    PositionLogprobs,
    Provider,
    RetryableError,
    TokenLogprob,
    ToolCall,
    ToolSpec,
    Usage,
)

CompatStructured = Literal["json_schema", "json_mode", "prompt"]


def to_openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": tc.id,
                    "type": "function",
                    "function": {"name": tc.name, "arguments": json.dumps(tc.arguments, ensure_ascii=False)},
                }
                for tc in m.tool_calls
            ]
            msg["content"] = m.content or None
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id or ""
        if m.name and m.role in ("user", "assistant", "system"):
            msg["name"] = m.name
        out.append(msg)
    return out


def to_openai_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def openai_tool_choice(choice: str) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def parse_tool_arguments(raw: str | None) -> tuple[dict[str, Any], str | None]:
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError as e:
        return {}, f"arguments are not valid JSON ({e.msg} at column {e.colno}): {(raw or '')[:200]}"
    if not isinstance(value, dict):
        return {}, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, None


class OpenAIProvider(Provider):
    """`openai/<model>` through `AsyncOpenAI().chat.completions.create`.

    Structured output: a strict JSON-schema response format. Logprobs: `logprobs=True, top_logprobs=k`."""

    name = "openai"
    capabilities = Capabilities(logprobs=True, tools=True, structured_output="native")
    default_key_env = "OPENAI_API_KEY"
    key_required = True

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
            import openai
        except ImportError as e:
            raise missing_sdk("openai", self.name) from e
        self._sdk = openai
        self.base_url = base_url
        self.key_env = api_key_env or self.default_key_env
        key = api_key_from_env(self.key_env, self.model_id, required=self.key_required)
        self._client = openai.AsyncOpenAI(
            api_key=key or "not-needed",
            base_url=base_url,
            timeout=timeout_s,
            max_retries=0,
            default_headers=default_headers,
        )

    def _token_limit_field(self) -> str:
        return "max_completion_tokens"

    def _structured_request(
        self, messages: list[Message], config: GenerateConfig, kwargs: dict[str, Any]
    ) -> list[Message]:
        """Add the response format; return the messages to send (unchanged for native schemas)."""
        assert config.response_model is not None
        strict = structured.strict_json_schema(config.response_model)
        kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": structured.schema_name(config.response_model),
                "schema": strict if strict is not None else structured.json_schema(config.response_model),
                "strict": strict is not None,
            },
        }
        return messages

    def build_request(self, messages: list[Message], config: GenerateConfig) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.model}
        if config.response_model is not None:
            messages = self._structured_request(messages, config, kwargs)
        kwargs["messages"] = to_openai_messages(messages)
        kwargs[self._token_limit_field()] = config.max_tokens
        kwargs["temperature"] = config.temperature
        if config.top_p is not None:
            kwargs["top_p"] = config.top_p
        if config.seed is not None:
            kwargs["seed"] = config.seed
        if config.stop:
            kwargs["stop"] = list(config.stop)
        if config.logprobs:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = config.top_logprobs
        if config.tools:
            kwargs["tools"] = to_openai_tools(config.tools)
            kwargs["tool_choice"] = openai_tool_choice(config.tool_choice)
        return kwargs

    async def generate(self, messages: list[Message], config: GenerateConfig) -> GenerateResult:
        request = self.build_request(messages, config)
        call_kwargs = dict(request)
        if config.extra:
            call_kwargs["extra_body"] = dict(config.extra)
            request = {**request, **config.extra}
        try:
            response = await self._client.chat.completions.create(**call_kwargs)
        except Exception as e:
            raise map_exception(e, self._sdk, self.model_id, self.key_env) from e
        try:
            return self._parse(response, request)
        except (AttributeError, IndexError, KeyError, TypeError) as e:
            raise RetryableError(f"{self.model_id}: malformed reply from the server: {e}") from e

    # -- for provider batches (caft.llm.batch): the same body and the same parsing as `generate` --------

    @property
    def sdk_client(self) -> Any:
        """The SDK's `AsyncOpenAI` client (files and batches endpoints)."""
        return self._client

    def request_body(self, messages: list[Message], config: GenerateConfig) -> dict[str, Any]:
        """The JSON body `generate` sends for this request (provider-specific `extra` fields merged in)."""
        request = self.build_request(messages, config)
        return {**request, **config.extra} if config.extra else request

    def parse_body(
        self, body: dict[str, Any], messages: list[Message], config: GenerateConfig
    ) -> GenerateResult:
        """A chat-completion JSON body (e.g. a batch result line's) parsed exactly as `generate` parses one."""
        request = self.request_body(messages, config)
        try:
            response = self._sdk.types.chat.ChatCompletion.model_validate(body)
            return self._parse(response, request)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise RetryableError(f"{self.model_id}: malformed reply in a batch result: {e}") from e

    def _parse(self, response: Any, request: dict[str, Any]) -> GenerateResult:
        if not response.choices:
            raise RetryableError(f"{self.model_id}: the reply has no choices")
        choice = response.choices[0]
        msg = choice.message
        tool_calls = []
        for tc in msg.tool_calls or []:
            args, err = parse_tool_arguments(tc.function.arguments)
            tool_calls.append(ToolCall(id=tc.id, name=tc.function.name, arguments=args, parse_error=err))
        logprobs = None
        if choice.logprobs is not None and choice.logprobs.content is not None:
            logprobs = [
                PositionLogprobs(
                    token=pos.token,
                    logprob=pos.logprob,
                    top=[TokenLogprob(token=t.token, logprob=t.logprob) for t in pos.top_logprobs or []],
                )
                for pos in choice.logprobs.content
            ]
        usage = Usage()
        if response.usage is not None:
            usage = Usage(
                input_tokens=response.usage.prompt_tokens or 0,
                output_tokens=response.usage.completion_tokens or 0,
            )
        return GenerateResult(
            text=msg.content or "",
            logprobs=logprobs,
            tool_calls=tool_calls,
            usage=usage,
            # A refusal comes with no content; say so instead of returning an unexplained empty text.
            finish_reason="refusal"
            if getattr(msg, "refusal", None) and not msg.content
            else choice.finish_reason,
            model=response.model or self.model,
            raw_request=request,
            raw_response=response.model_dump(mode="json", exclude_none=True),
        )

    async def aclose(self) -> None:
        await self._client.close()


class OpenAICompatibleProvider(OpenAIProvider):
    """`openai-compatible/<model>` at `base_url` (vLLM, Ollama, llama.cpp, gateways).

    Such servers differ in what they accept, so structured output is chosen by `structured`:
    `json_mode` (default: `response_format={"type": "json_object"}` plus the schema in the system prompt),
    `json_schema` (a JSON-schema response format, e.g. vLLM's guided decoding), or `prompt` (the schema in the
    system prompt only). Validation happens in the client in every case. A key is optional
    (`api_key_env`); most local servers need none."""

    name = "openai-compatible"
    capabilities = Capabilities(logprobs=True, tools=True, structured_output="json_mode")
    default_key_env = "CAFT_JUDGE_API_KEY"
    key_required = False

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 600.0,
        default_headers: dict[str, str] | None = None,
        structured: CompatStructured = "json_mode",
        logprobs: bool = True,
    ) -> None:
        if not base_url:
            raise FatalError(
                f"openai-compatible/{model} needs a base_url (e.g. http://localhost:8000/v1 for vLLM, "
                "http://localhost:11434/v1 for Ollama); set judge.base_url"
            )
        self.key_required = api_key_env is not None
        super().__init__(model, base_url, api_key_env, timeout_s, default_headers)
        self.structured_mode: CompatStructured = structured
        mode: Literal["native", "json_mode", "prompt"] = "native"
        if structured != "json_schema":
            mode = structured
        self.capabilities = Capabilities(logprobs=logprobs, tools=True, structured_output=mode)

    def _token_limit_field(self) -> str:
        return "max_tokens"

    def _structured_request(
        self, messages: list[Message], config: GenerateConfig, kwargs: dict[str, Any]
    ) -> list[Message]:
        assert config.response_model is not None
        if self.structured_mode == "json_schema":
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": structured.schema_name(config.response_model),
                    "schema": structured.json_schema(config.response_model),
                },
            }
            return messages
        if self.structured_mode == "json_mode":
            kwargs["response_format"] = {"type": "json_object"}
        return structured.with_schema_instructions(messages, config.response_model)
