"""Shared bits for the LLM-layer tests: fake keys, the provider matrix, a client pointed at the fake server."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from caft.llm import LLMClient, Message, get_provider
from caft.testing.fakellm import FakeLLM

T = TypeVar("T")

# Key-shaped values, so that a leak would be visible in any file the tests grep.
# Fake keys, assembled at run time so that no key-shaped literal is committed (secret scanners flag those).
OPENAI_KEY = "sk-" + "testkeyOPENAI0123456789abcdefXYZ"
ANTHROPIC_KEY = "sk-ant-" + "testkeyANTHROPIC0123456789abc"
COMPAT_KEY = "compat-secret-0123456789-qwerty"

PROVIDERS = ["openai/gpt-4.1", "anthropic/claude-sonnet-4-6", "openai-compatible/qwen2.5-7b-instruct"]


def set_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("CAFT_JUDGE_API_KEY", COMPAT_KEY)


def base_url(fake: FakeLLM, model: str) -> str:
    return fake.anthropic_base_url if model.startswith("anthropic/") else fake.openai_base_url


def make_client(fake: FakeLLM, model: str, **kw: Any) -> LLMClient:
    """A client for `model` at the fake server. Compatible servers get a key here (CAFT_JUDGE_API_KEY) so
    that the no-leak tests cover all three providers. Backoff is shortened so fault tests stay fast."""
    provider_kw: dict[str, Any] = {}
    if model.startswith("openai-compatible/"):
        provider_kw["api_key_env"] = "CAFT_JUDGE_API_KEY"
    if "structured" in kw:
        provider_kw["structured"] = kw.pop("structured")
    if "timeout_s" in kw:  # the SDK's timeout and the client's, as from_config sets them
        provider_kw["timeout_s"] = kw["timeout_s"]
    provider = get_provider(model, base_url=base_url(fake, model), **provider_kw)
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return LLMClient(provider, **kw)


def user(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
