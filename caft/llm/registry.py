"""Providers by name: `get_provider("openai/gpt-4.1")`. SDK-backed providers are imported only when asked
for, so `import caft.llm` never loads openai or anthropic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from caft.errors import ConfigError
from caft.llm.types import Provider

ProviderFactory = Callable[..., Provider]
_FACTORIES: dict[str, ProviderFactory] = {}


def register_provider(prefix: str, factory: ProviderFactory) -> None:
    """Make `<prefix>/<model>` build `factory(model, base_url=..., api_key_env=..., **kw)`."""
    if prefix in _FACTORIES:
        raise ValueError(f"a provider named {prefix!r} is already registered")
    _FACTORIES[prefix] = factory


def provider_names() -> list[str]:
    return sorted(_FACTORIES)


def get_provider(
    model: str, base_url: str | None = None, api_key_env: str | None = None, **kw: Any
) -> Provider:
    """The provider for `<provider>/<model>`. Keys come from the environment (`api_key_env` names the
    variable); `kw` go to the provider (e.g. `timeout_s`, `replies=` for mock, `structured=` for
    openai-compatible)."""
    prefix, sep, name = model.partition("/")
    if not sep or not name:
        raise ConfigError(f"model {model!r} must be '<provider>/<model>', e.g. 'openai/gpt-4.1'")
    factory = _FACTORIES.get(prefix)
    if factory is None:
        raise ConfigError(f"unknown provider {prefix!r} in {model!r}; known: {', '.join(provider_names())}")
    return factory(name, base_url=base_url, api_key_env=api_key_env, **kw)


def _openai(model: str, **kw: Any) -> Provider:
    from caft.llm.openai_provider import OpenAIProvider

    return OpenAIProvider(model, **kw)


def _compatible(model: str, **kw: Any) -> Provider:
    from caft.llm.openai_provider import OpenAICompatibleProvider

    return OpenAICompatibleProvider(model, **kw)


def _anthropic(model: str, **kw: Any) -> Provider:
    from caft.llm.anthropic_provider import AnthropicProvider

    return AnthropicProvider(model, **kw)


def _mock(model: str, **kw: Any) -> Provider:
    from caft.llm.mock import MockProvider

    for unused in ("base_url", "api_key_env", "timeout_s"):  # a mock has no server
        kw.pop(unused, None)
    return MockProvider(model, **kw)


register_provider("openai", _openai)
register_provider("openai-compatible", _compatible)
register_provider("anthropic", _anthropic)
register_provider("mock", _mock)
