"""`LLMClient`: everything that happens around one provider's `generate`, once for all providers.

Order of events for one request:

1. capability check (logprobs or tools asked of a provider that lacks them: `CapabilityError`, no request);
2. budget check (`max_cost_usd` reached: `BudgetExceededError`, no request);
3. cache read (policy permitting): a hit costs no request and no money;
4. the request, under the concurrency semaphore and the request timeout, retried by tenacity on
   `RetryableError` (rate limit, timeout, connection error, 5xx, malformed reply) with exponential backoff
   and jitter, or exactly the server's Retry-After when it gave one (capped); `FatalError` is never retried
   (the policy: `caft.llm.retry`);
5. structured output: validation against the response model, one repair round that shows the model its
   validation error, then `StructuredOutputError`;
6. accounting (tokens and dollars per call, per stage, per run), cache write, one call-log record
   (both: `caft.llm.accounting`).

Failed calls are logged too, and nothing from a failed call is cached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from caft.llm import structured
from caft.llm.accounting import CallLog, UsageLedger
from caft.llm.cache import CachePolicy, ResponseCache, cache_key, should_read, should_write
from caft.llm.config import JudgeConfig
from caft.llm.prices import Price, find_price, load_prices
from caft.llm.redact import redact
from caft.llm.retry import RetriesStoppedError, RetryPolicy
from caft.llm.types import (
    BudgetExceededError,
    Capabilities,
    CapabilityError,
    FatalError,
    GenerateConfig,
    GenerateResult,
    LLMError,
    Message,
    Provider,
    RetryableError,
    StructuredOutputError,
    UsageTotals,
)

logger = logging.getLogger(__name__)

CACHE_FILE = "llm_cache.sqlite"
CALL_LOG_FILE = "llm_calls.jsonl"

__all__ = ["CACHE_FILE", "CALL_LOG_FILE", "LLMClient", "Request", "ResultOrError", "RetriesStoppedError"]

Request = tuple[list[Message], GenerateConfig]
ResultOrError = GenerateResult | LLMError


class LLMClient:
    """Retries, bounded concurrency, a disk cache, accounting and a call log around one `Provider`.

    `prices`: None (the built-in table), a path to a YAML override file, or a ready table.
    `backoff_initial_s`, `backoff_max_s`: the exponential backoff (with jitter of one initial step);
    `max_retry_after_s`: the longest server-requested wait honoured (longer ones are cut to it); all three
    and `max_retries` live in `self.retry` (a `RetryPolicy`), the totals in `self.ledger` (a `UsageLedger`).

    One client serves one event loop (the SDK's connection pool belongs to it). `max_cost_usd` is checked
    before each request, so requests already in flight may overshoot it by up to `max_concurrency` calls.
    The call log is flushed per record but not fsynced (see `CallLog`)."""

    def __init__(
        self,
        provider: Provider,
        max_concurrency: int = 16,
        max_retries: int = 6,
        timeout_s: float = 60.0,
        cache_path: str | Path | None = None,
        cache_policy: CachePolicy = "deterministic",
        call_log: str | Path | None = None,
        stage: str = "",
        prices: dict[str, Price] | str | Path | None = None,
        max_cost_usd: float | None = None,
        *,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_retry_after_s: float = 120.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.provider = provider
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.cache_policy: CachePolicy = cache_policy
        self.stage = stage
        self.max_cost_usd = max_cost_usd
        self.prices = prices if isinstance(prices, dict) else load_prices(prices)
        self.retry = RetryPolicy(
            max_retries,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            max_retry_after_s=max_retry_after_s,
        )
        self.ledger = UsageLedger(
            provider.model_id,
            find_price(self.prices, provider.name, provider.model),
            warn_unpriced=provider.name != "mock",
        )
        self._sem = asyncio.Semaphore(max_concurrency)
        self._cache = ResponseCache(cache_path) if cache_path is not None and cache_policy != "off" else None
        self._log = CallLog(call_log, provider.model_id)
        self.requests_sent = 0
        """Requests handed to the provider, every retry and repair round included."""

    @classmethod
    def from_config(
        cls,
        config: JudgeConfig,
        run_dir: str | Path | None = None,
        stage: str = "",
        *,
        provider: Provider | None = None,
        **provider_kw: Any,
    ) -> LLMClient:
        """A client for `config`; with `run_dir`, the cache is `<run_dir>/llm_cache.sqlite` and every call
        is appended to `<run_dir>/llm_calls.jsonl`. `provider` replaces the one `config.model` names
        (tests pass a `MockProvider` here); `provider_kw` go to `get_provider`."""
        from caft.llm.registry import get_provider

        if provider is None:
            provider = get_provider(
                config.model,
                base_url=config.base_url,
                api_key_env=config.api_key_env,
                timeout_s=config.timeout_s,
                **provider_kw,
            )
        root = Path(run_dir) if run_dir is not None else None
        return cls(
            provider,
            max_concurrency=config.max_concurrency,
            max_retries=config.max_retries,
            timeout_s=config.timeout_s,
            cache_path=root / CACHE_FILE if root is not None else None,
            cache_policy=config.cache,
            call_log=root / CALL_LOG_FILE if root is not None else None,
            stage=stage,
            prices=config.prices_path,
            max_cost_usd=config.max_cost_usd,
        )

    def stop_retries(self) -> None:
        """From now on, no failed call is retried: a call in its backoff wait, or failing later, raises
        `RetriesStoppedError` at once. Attempts already in flight still finish (within `timeout_s`). Meant
        for the first SIGINT/SIGTERM, so that a hung or failing judge cannot keep the process alive through
        its retries."""
        self.retry.stop()

    @property
    def retries_stopped(self) -> bool:
        return self.retry.stopped

    @property
    def capabilities(self) -> Capabilities:
        return self.provider.capabilities

    @property
    def model_id(self) -> str:
        return self.provider.model_id

    @property
    def usage(self) -> UsageTotals:
        """A snapshot of the running totals."""
        return self.ledger.totals

    # -- one request ---------------------------------------------------------------------------------

    async def generate(
        self, messages: list[Message], config: GenerateConfig | None = None, *, stage: str | None = None
    ) -> GenerateResult:
        """One request through cache, retries and accounting. Raises an `LLMError` subclass on failure."""
        config = config or GenerateConfig()
        stage_name = self.stage if stage is None else stage
        self._check(messages, config)
        key = cache_key(self.provider.name, self.provider.model, self.provider.base_url, messages, config)
        if self._cache is not None and should_read(self.cache_policy, config):
            hit = self._cache.get(key)
            if hit is not None:
                parsed = None
                if config.response_model is not None:
                    parsed, _ = structured.validate(config.response_model, hit.text)
                if config.response_model is None or parsed is not None:
                    return self._cached(hit, parsed, key, stage_name)
        try:
            result = await self._request(messages, config, key, stage_name)
            if config.response_model is not None:
                result = await self._structured(messages, config, result, key, stage_name)
        except LLMError as e:
            self.ledger.add_failure(stage_name)
            self._log.write(key, stage_name, None, error=e)
            raise
        if self._cache is not None and should_write(self.cache_policy, config):
            self._cache.put(key, self.provider.name, self.provider.model, result, raw_redacted=True)
        return result

    def _check(self, messages: list[Message], config: GenerateConfig) -> None:
        if not messages:
            raise FatalError("generate() needs at least one message")
        caps = self.provider.capabilities
        if config.logprobs and not caps.logprobs:
            raise CapabilityError(
                f"{self.model_id} cannot return logprobs; use a scoring rule without them "
                "(e.g. sampled scores) or a provider that has them (openai, openai-compatible)"
            )
        if config.tools and not caps.tools:
            raise CapabilityError(f"{self.model_id} does not support tool calls")
        if self.max_cost_usd is not None and self.ledger.cost_usd >= self.max_cost_usd:
            raise BudgetExceededError(
                f"the budget of ${self.max_cost_usd:.2f} for {self.model_id} is spent "
                f"(${self.ledger.cost_usd:.4f} so far); raise max_cost_usd to continue"
            )

    def _cached(self, hit: GenerateResult, parsed: Any, key: str, stage: str) -> GenerateResult:
        result = hit.model_copy(
            update={"parsed": parsed, "cached": True, "usage": hit.usage.model_copy(update={"cost_usd": 0.0})}
        )
        self.ledger.add_cached(stage)
        self._log.write(key, stage, result)
        return result

    async def _structured(
        self, messages: list[Message], config: GenerateConfig, result: GenerateResult, key: str, stage: str
    ) -> GenerateResult:
        """Validate; on failure one repair round with the error shown; then `StructuredOutputError`."""
        assert config.response_model is not None
        parsed, err = structured.validate(config.response_model, result.text)
        if parsed is not None:
            return result.model_copy(update={"parsed": parsed})
        logger.info("%s: reply did not validate (%s); one repair round", self.model_id, err)
        repair = structured.repair_messages(messages, result.text, err or "invalid")
        second = await self._request(repair, config, key, stage, repair_round=True)
        parsed, err2 = structured.validate(config.response_model, second.text)
        if parsed is not None:
            return second.model_copy(update={"parsed": parsed})
        raise StructuredOutputError(
            f"{self.model_id}: reply did not validate against {config.response_model.__name__} after one "
            f"repair round: {err2}",
            raw_text=second.text,
            result=second,
        )

    async def _request(
        self,
        messages: list[Message],
        config: GenerateConfig,
        key: str,
        stage: str,
        repair_round: bool = False,
    ) -> GenerateResult:
        attempts = 1
        try:  # the common case, without the retry machinery's per-call cost
            result = await self._attempt(messages, config)
        except RetryableError as first_failure:
            result, attempts = await self.retry.retry(
                lambda: self._attempt(messages, config), first_failure, self.model_id
            )
        self.ledger.add_call(result, stage)
        self._log.write(key, stage, result, attempts=attempts, repair_round=repair_round)
        return result

    async def _attempt(self, messages: list[Message], config: GenerateConfig) -> GenerateResult:
        async with self._sem:
            self.requests_sent += 1
            t0 = time.perf_counter()
            try:
                result = await asyncio.wait_for(self.provider.generate(messages, config), self.timeout_s)
            except asyncio.TimeoutError:
                raise RetryableError(f"no reply within {self.timeout_s:g} s (request timeout)") from None
            # Redacted once, here (one pass over both); the cache and the call log store these as they are.
            raw = redact({"raw_request": result.raw_request, "raw_response": result.raw_response})
            return result.model_copy(update={"latency_s": time.perf_counter() - t0, **raw})

    # -- many requests -------------------------------------------------------------------------------

    async def generate_many(
        self,
        requests: Sequence[Request],
        *,
        stage: str | None = None,
        on_result: Callable[[int, ResultOrError], None] | None = None,
    ) -> list[ResultOrError]:
        """All requests, at most `max_concurrency` at a time, results in input order. A request that fails
        gets its `LLMError` in its slot; `FatalError` and `BudgetExceededError` stop the batch and are
        raised (requests already in flight finish first, so their replies are cached and logged).
        `on_result(index, result_or_error)` is called as each one completes (e.g. to append to a file)."""
        items = list(requests)
        out: list[ResultOrError | None] = [None] * len(items)
        pending = iter(enumerate(items))
        stop: list[LLMError] = []

        async def worker() -> None:
            for i, (messages, config) in pending:
                if stop:
                    return
                try:
                    res: ResultOrError = await self.generate(messages, config, stage=stage)
                except (FatalError, BudgetExceededError) as e:
                    stop.append(e)
                    return
                except LLMError as e:
                    res = e
                out[i] = res
                if on_result is not None:
                    on_result(i, res)

        workers = [asyncio.ensure_future(worker()) for _ in range(min(self.max_concurrency, len(items)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            raise
        if stop:
            raise stop[0]
        done: list[ResultOrError] = []
        for i, r in enumerate(out):
            if r is None:  # only possible if a worker returned early, which `stop` covers
                raise RuntimeError(f"request {i} produced no result")
            done.append(r)
        return done

    # -- replies obtained another way (caft.llm.batch) ---------------------------------------------------

    def check(self, messages: list[Message], config: GenerateConfig) -> None:
        """Raise what `generate` raises before sending anything (capability, budget)."""
        self._check(messages, config)

    def lookup(
        self, messages: list[Message], config: GenerateConfig, *, stage: str | None = None
    ) -> GenerateResult | None:
        """The cache hit `generate` would return for this request (accounted and logged as one), or None."""
        if self._cache is None or not should_read(self.cache_policy, config):
            return None
        key = cache_key(self.provider.name, self.provider.model, self.provider.base_url, messages, config)
        hit = self._cache.get(key)
        if hit is None:
            return None
        parsed = None
        if config.response_model is not None:
            parsed, _ = structured.validate(config.response_model, hit.text)
            if parsed is None:
                return None
        return self._cached(hit, parsed, key, self.stage if stage is None else stage)

    def record(
        self,
        messages: list[Message],
        config: GenerateConfig,
        result: GenerateResult,
        *,
        stage: str | None = None,
        price: Price | None = None,
        replayed: bool = False,
    ) -> GenerateResult:
        """Account, log and cache a reply that did not come through `generate` (a provider batch), as
        `generate` would have. `price` replaces the model's own (batch prices); `replayed=True` counts a
        reply a previous process already paid for as a cache hit (no tokens, no dollars)."""
        stage_name = self.stage if stage is None else stage
        key = cache_key(self.provider.name, self.provider.model, self.provider.base_url, messages, config)
        if replayed:
            return self._cached(result, result.parsed, key, stage_name)
        raw = redact({"raw_request": result.raw_request, "raw_response": result.raw_response})
        result = result.model_copy(update=raw)
        self.ledger.add_call(result, stage_name, price)
        self._log.write(key, stage_name, result, attempts=1)
        if self._cache is not None and should_write(self.cache_policy, config):
            self._cache.put(key, self.provider.name, self.provider.model, result, raw_redacted=True)
        return result

    async def aclose(self) -> None:
        await self.provider.aclose()
        if self._cache is not None:
            self._cache.close()
        self._log.close()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
