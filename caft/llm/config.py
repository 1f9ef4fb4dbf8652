"""The judge config: which model answers, how hard to push it, and what to keep on disk."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from caft.config import CaftConfig
from caft.llm.cache import CachePolicy

PROVIDER_PREFIXES = ("openai", "anthropic", "openai-compatible", "mock")


class JudgeConfig(CaftConfig):
    """An LLM used as a judge or agent. API keys are never part of it: they come from the environment."""

    model: str = "openai/gpt-4.1"
    """`<provider>/<model>`: `openai/gpt-4.1`, `anthropic/claude-sonnet-4-5`, `openai-compatible/<served name>`
    (with `base_url`, for vLLM, Ollama or any server speaking the OpenAI API), or `mock/<name>` (scripted
    replies, tests only)."""
    base_url: str | None = None
    """Server address, e.g. `http://localhost:8000/v1`. Required for `openai-compatible`; optional for
    `openai`/`anthropic` (a proxy)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the key. Default: OPENAI_API_KEY for openai, ANTHROPIC_API_KEY
    for anthropic, none needed for openai-compatible. The key itself never goes in a config."""
    max_concurrency: int = Field(default=16, ge=1)
    """Requests in flight at once for this judge (a semaphore; results keep their input order)."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Seconds one request may take before it counts as a timeout (and is retried)."""
    max_retries: int = Field(default=6, ge=0)
    """Retries after the first attempt on rate limits, timeouts, connection errors and 5xx, with exponential
    backoff and jitter, honouring Retry-After. Auth and validation errors are never retried."""
    cache: CachePolicy = "deterministic"
    """`deterministic`: cache temperature-0 requests; `all`: also sampled ones; `off`: no cache; `refresh`:
    ignore cached replies and overwrite them."""
    prices_path: Path | None = None
    """A YAML price table (model -> {input_per_mtok, output_per_mtok}) whose entries override the built-in
    `caft/data/prices.yaml`."""
    max_cost_usd: float | None = Field(default=None, gt=0)
    """Stop with `BudgetExceededError` once this many dollars are spent by this judge (unset: no limit)."""

    @field_validator("model")
    @classmethod
    def _known_provider(cls, v: str) -> str:
        prefix, sep, name = v.partition("/")
        if not sep or not name or prefix not in PROVIDER_PREFIXES:
            raise ValueError(
                f"model must be '<provider>/<model>' with provider one of {', '.join(PROVIDER_PREFIXES)}; "
                f"got {v!r} (e.g. 'openai/gpt-4.1')"
            )
        return v
