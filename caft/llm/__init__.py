"""caft.llm: LLM providers behind one async contract, with retries, bounded concurrency, a disk cache,
cost accounting and a call log around them (`LLMClient`).

    provider = get_provider("openai/gpt-4.1")          # or anthropic/..., openai-compatible/..., mock/...
    client = LLMClient(provider, max_concurrency=16)   # or LLMClient.from_config(JudgeConfig(...), run_dir)
    result = await client.generate([Message(role="user", content="Hi")], GenerateConfig())
    results = await run_batch(client, [(messages, config), ...], state_dir)   # provider batch API, resumable
"""

from caft.llm.batch import BatchPendingError, generate_all, run_batch, supports_batch
from caft.llm.cache import CachePolicy, ResponseCache, cache_key
from caft.llm.client import LLMClient
from caft.llm.config import JudgeConfig
from caft.llm.mock import MockProvider
from caft.llm.prices import Price, load_prices
from caft.llm.registry import get_provider, provider_names, register_provider
from caft.llm.types import (
    BudgetExceededError,
    Capabilities,
    CapabilityError,
    FatalError,
    GenerateConfig,
    GenerateResult,
    LLMError,
    Message,
    PositionLogprobs,
    Provider,
    RetryableError,
    ScriptExhaustedError,
    StructuredOutputError,
    TokenLogprob,
    ToolCall,
    ToolSpec,
    Usage,
    UsageTotals,
)

__all__ = [
    "BatchPendingError",
    "BudgetExceededError",
    "CachePolicy",
    "Capabilities",
    "CapabilityError",
    "FatalError",
    "GenerateConfig",
    "GenerateResult",
    "JudgeConfig",
    "LLMClient",
    "LLMError",
    "Message",
    "MockProvider",
    "PositionLogprobs",
    "Price",
    "Provider",
    "ResponseCache",
    "RetryableError",
    "ScriptExhaustedError",
    "StructuredOutputError",
    "TokenLogprob",
    "ToolCall",
    "ToolSpec",
    "Usage",
    "UsageTotals",
    "cache_key",
    "generate_all",
    "get_provider",
    "load_prices",
    "provider_names",
    "register_provider",
    "run_batch",
    "supports_batch",
]
