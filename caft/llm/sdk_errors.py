"""Turning SDK exceptions (openai, anthropic: the same shapes) into the LLM layer's two kinds of failure.

Retryable: rate limits (429), request timeouts (408), conflicts and locks (409, 423), server errors (5xx),
connection errors, timeouts, and replies that are not the JSON they claim to be. Fatal: everything else the
server refused (400 bad request, 401 auth, 403 permission, 404 unknown model, 422 invalid...), because
sending it again cannot change the answer.
"""

from __future__ import annotations

import json
import os
from typing import Any

from caft.env import scrub
from caft.llm.types import FatalError, RetryableError

RETRYABLE_STATUS = frozenset({408, 409, 423, 425, 429})


def api_key_from_env(var: str, provider: str, required: bool = True) -> str | None:
    """The key from the environment, or a `FatalError` that says which variable to set."""
    value = os.environ.get(var)
    if not value and required:
        raise FatalError(
            f"{provider}: the API key variable {var} is not set; export {var}=... "
            "(or point judge.api_key_env at the variable that holds your key)"
        )
    return value or None


def missing_sdk(package: str, provider: str) -> FatalError:
    return FatalError(
        f"the {provider} provider needs the `{package}` package, which is not installed; "
        f"install it with `pip install {package}` (or `pip install caft` with its default dependencies)"
    )


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (a number); None when absent or an HTTP date."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) / scale
        except (TypeError, ValueError):
            continue
        if value >= 0:
            return value
    return None


def _body_message(body: object) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        return json.dumps(body)[:500]
    return str(body)[:500]


def map_exception(exc: Exception, sdk: Any, label: str, key_env: str | None) -> Exception:
    """The `RetryableError`/`FatalError` for an exception raised by an SDK call (others pass through)."""
    if isinstance(exc, sdk.APIStatusError):
        status = int(exc.status_code)
        detail = scrub(_body_message(exc.body))
        if status in RETRYABLE_STATUS or status >= 500:
            return RetryableError(
                f"{label}: HTTP {status}: {detail}",
                retry_after=retry_after_seconds(exc.response.headers),
                status=status,
            )
        if status in (401, 403):
            where = f" in {key_env}" if key_env else ""
            return FatalError(
                f"{label}: HTTP {status} ({'authentication' if status == 401 else 'permission'} refused): "
                f"{detail}. Check the API key{where} and that it may use this model.",
                status=status,
            )
        if status == 404:
            return FatalError(
                f"{label}: HTTP 404: {detail}. Check the model name and the base URL.", status=status
            )
        return FatalError(f"{label}: HTTP {status} (request refused): {detail}", status=status)
    if isinstance(exc, sdk.APITimeoutError):
        return RetryableError(f"{label}: request timed out")
    if isinstance(exc, sdk.APIConnectionError):
        cause = exc.__cause__ or exc
        return RetryableError(f"{label}: connection error: {type(cause).__name__}: {scrub(str(cause))[:300]}")
    if isinstance(exc, (sdk.APIResponseValidationError, ValueError)):
        return RetryableError(f"{label}: malformed reply from the server: {scrub(str(exc))[:300]}")
    return exc
