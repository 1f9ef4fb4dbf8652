"""The LLM contract: what a provider is given and what it returns.

A provider implements ONE method, `async generate(messages, config) -> GenerateResult`. Retries, concurrency
limits, the disk cache, cost accounting and the call log live around that method (in `caft.llm.client`),
once for every provider.
"""

from __future__ import annotations

import abc
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from caft.errors import CaftError

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(BaseModel):
    """A tool call requested by the model."""

    id: str
    name: str
    arguments: dict[str, Any]
    parse_error: str | None = None
    """Set when the model's argument string was not a JSON object (`arguments` is then empty); an agent can
    show it to the model instead of guessing."""


class Message(BaseModel):
    """One chat message. `tool_calls` on assistant messages; `tool_call_id` on tool results."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


class ToolSpec(BaseModel):
    """A tool offered to the model: name, description, JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


class GenerateConfig(BaseModel):
    """Everything that changes the reply (all of it enters the cache key)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    temperature: float = 0.0
    top_p: float | None = None
    max_tokens: int = 1024
    seed: int | None = None
    stop: list[str] | None = None
    logprobs: bool = False
    """Request per-token logprobs (providers without the capability raise `CapabilityError`)."""
    top_logprobs: int = 20
    response_model: type[BaseModel] | None = Field(default=None, exclude=True)
    """A pydantic model for structured output; the result's `parsed` holds the validated instance."""
    tools: list[ToolSpec] = Field(default_factory=list)
    tool_choice: Literal["auto", "none", "required"] | str = "auto"
    extra: dict[str, Any] = Field(default_factory=dict)
    """Provider-specific request fields passed through as is."""


class TokenLogprob(BaseModel):
    token: str
    logprob: float


class PositionLogprobs(BaseModel):
    """The sampled token at one position and the top alternatives there."""

    token: str
    logprob: float
    top: list[TokenLogprob] = Field(default_factory=list)


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    """None when the model is not in the price table."""


class GenerateResult(BaseModel):
    """What a provider returns. `raw_request`/`raw_response` are credential-free copies of the wire data."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    text: str
    parsed: Any = None
    logprobs: list[PositionLogprobs] | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str | None = None
    model: str = ""
    raw_request: dict[str, Any] = Field(default_factory=dict)
    raw_response: dict[str, Any] = Field(default_factory=dict)
    cached: bool = False
    latency_s: float = 0.0


class UsageTotals(BaseModel):
    """Running totals of a client: per run, and per stage in `by_stage`. Cache hits count in
    `cached_calls` only (they cost no tokens and no money)."""

    calls: int = 0
    """Requests that reached the provider and succeeded (retries of one request count once)."""
    cached_calls: int = 0
    failed_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    """Dollars for the calls whose model has a price; `unpriced_calls` counts the others."""
    unpriced_calls: int = 0
    by_stage: dict[str, UsageTotals] = Field(default_factory=dict)


class Capabilities(BaseModel):
    logprobs: bool = False
    tools: bool = False
    structured_output: Literal["native", "tool", "json_mode", "prompt"] = "prompt"


class Provider(abc.ABC):
    """One LLM backend. Subclasses set `name`, `capabilities`, and implement `generate`."""

    name: str = "provider"
    capabilities: Capabilities = Capabilities()
    base_url: str | None = None
    """The server address when it is not the provider's default (it enters the cache key)."""

    def __init__(self, model: str) -> None:
        self.model = model

    @property
    def model_id(self) -> str:
        """`<provider>/<model>`, as the user wrote it."""
        return f"{self.name}/{self.model}"

    @abc.abstractmethod
    async def generate(self, messages: list[Message], config: GenerateConfig) -> GenerateResult:
        """One request; raise an `LLMError` subclass on failure."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release network clients."""


class LLMError(CaftError):
    """Base of every error from the LLM layer (a `CaftError`, so the CLI prints its message cleanly)."""


class RetryableError(LLMError):
    """Rate limit, timeout, connection error, 5xx: worth retrying. `retry_after` in seconds when the server said."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class FatalError(LLMError):
    """Authentication, permission, bad request: retrying cannot help; stops the run with this message."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CapabilityError(LLMError):
    """The provider cannot do what was asked (e.g. logprobs on Anthropic)."""


class StructuredOutputError(LLMError):
    """The reply did not validate against the response model, even after one repair round.
    Callers record it as `unscored: parse_failure`, never as a value."""

    def __init__(self, message: str, raw_text: str = "", result: GenerateResult | None = None) -> None:
        super().__init__(message)
        self.raw_text = raw_text
        self.result = result


class ScriptExhaustedError(LLMError):
    """A mock provider ran out of scripted replies."""


class BudgetExceededError(LLMError):
    """A dollar or call budget was reached; the caller stops cleanly and keeps what it has."""
