"""When and how long `LLMClient` waits before asking again: tenacity on `RetryableError`, exponential backoff
with jitter, or exactly the server's Retry-After (capped); and the switch that stops all further retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from caft.llm.types import LLMError, RetryableError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RetriesStoppedError(LLMError):
    """A failing call was not retried because `LLMClient.stop_retries` was called (the process is stopping).

    Nothing is known about the item the call was for: callers leave it undone, so a rerun asks again."""


class RetryPolicy:
    """`max_retries` retries after the first attempt; `backoff_initial_s`, `backoff_max_s`: the exponential
    backoff (with jitter of one initial step); `max_retry_after_s`: the longest server-requested wait
    honoured (longer ones are cut to it). `FatalError` and other non-retryable errors pass through."""

    def __init__(
        self,
        max_retries: int = 6,
        *,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_retry_after_s: float = 120.0,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        """No failed call is retried from now on; a call in its backoff wait raises at once."""
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    async def retry(
        self, attempt: Callable[[], Awaitable[T]], first_failure: RetryableError, label: str
    ) -> tuple[T, int]:
        """Call `attempt` again until it succeeds, after `first_failure` of a first attempt made by the
        caller (which skips the retry machinery's per-call cost in the common case). That failure is
        replayed to tenacity as attempt 1, so its backoff and Retry-After apply from the start.
        `label` (the model id) names the call in logs and errors. Returns (result, attempts)."""
        replay: list[RetryableError] = [first_failure]
        attempts = 0
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RetryableError),
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self.wait,
            before_sleep=lambda state: _log_retry(label, state),
            sleep=self._sleep,
            reraise=True,
        )
        last: RetryableError = first_failure
        try:
            async for try_ in retrying:
                with try_:
                    attempts += 1
                    if replay:
                        raise replay.pop()
                    if self.stopped:
                        raise RetriesStoppedError(
                            f"{label}: not retried after {attempts - 1} failed attempt(s), because "
                            f"the run is stopping (last error: {last})"
                        )
                    try:
                        result = await attempt()
                    except RetryableError as e:
                        last = e
                        raise
        except RetryableError as e:
            raise RetryableError(
                f"{label}: gave up after {attempts} attempt(s): {e}", retry_after=None, status=e.status
            ) from e
        return result, attempts

    def wait(self, state: RetryCallState) -> float:
        """Seconds before the next attempt: the server's Retry-After if it sent one, else the backoff."""
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, RetryableError) and exc.retry_after is not None:
            return max(0.0, min(exc.retry_after, self.max_retry_after_s))
        backoff = wait_exponential_jitter(
            multiplier=self.backoff_initial_s, max=self.backoff_max_s, jitter=self.backoff_initial_s
        )
        return float(backoff(state))

    async def _sleep(self, seconds: float) -> None:
        """tenacity's sleep between attempts, cut short by `stop`."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), timeout=seconds)


def _log_retry(label: str, state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    logger.info("%s: attempt %d failed (%s); retrying in %.2f s", label, state.attempt_number, exc, wait)
