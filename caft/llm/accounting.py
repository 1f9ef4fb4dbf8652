"""What `LLMClient` counts and writes down: tokens and dollars per call, per stage and per run
(`UsageLedger`), and one JSONL record per call, failed calls included (`CallLog`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from caft.env import scrub
from caft.llm.prices import Price
from caft.llm.types import GenerateResult, LLMError, StructuredOutputError, Usage, UsageTotals
from caft.rundir import JsonlWriter

logger = logging.getLogger(__name__)

_warned_unpriced: set[str] = set()


def _add(totals: UsageTotals, **delta: float) -> None:
    for name, value in delta.items():
        setattr(totals, name, getattr(totals, name) + value)


class UsageLedger:
    """Running totals for one model: every call counts in the run's totals and in its stage's.

    `price`: the model's own (None: tokens are counted, dollars are not, and one warning says so;
    `warn_unpriced=False` silences it, for the mock provider)."""

    def __init__(self, model_id: str, price: Price | None, *, warn_unpriced: bool = True) -> None:
        self.model_id = model_id
        self.price = price
        self.warn_unpriced = warn_unpriced
        self._totals = UsageTotals()

    @property
    def totals(self) -> UsageTotals:
        """A snapshot."""
        return self._totals.model_copy(deep=True)

    @property
    def cost_usd(self) -> float:
        return self._totals.cost_usd

    def _both(self, stage: str) -> tuple[UsageTotals, UsageTotals]:
        per_stage = self._totals.by_stage.get(stage)
        if per_stage is None:
            per_stage = self._totals.by_stage[stage] = UsageTotals()
        return self._totals, per_stage

    def add_call(self, result: GenerateResult, stage: str, price: Price | None = None) -> None:
        """Count a reply that was paid for; sets `result.usage.cost_usd` (None when unpriced). `price`
        replaces the model's own (batch prices)."""
        usage = result.usage
        cost: float | None = None
        price = price if price is not None else self.price
        if price is not None:
            cost = price.cost(usage.input_tokens, usage.output_tokens)
        elif self.warn_unpriced and self.model_id not in _warned_unpriced:
            _warned_unpriced.add(self.model_id)
            logger.warning(
                "%s has no price in the price table: counting its tokens but not dollars "
                "(add it with judge.prices_path)",
                self.model_id,
            )
        result.usage = Usage(
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, cost_usd=cost
        )
        for totals in self._both(stage):
            _add(
                totals,
                calls=1,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_usd=cost or 0.0,
                unpriced_calls=int(cost is None),
            )

    def add_cached(self, stage: str) -> None:
        for totals in self._both(stage):
            _add(totals, cached_calls=1)

    def add_failure(self, stage: str) -> None:
        for totals in self._both(stage):
            _add(totals, failed_calls=1)


class CallLog:
    """One record per call appended to a JSONL file, flushed per record but not fsynced (a process crash
    loses nothing, a power cut may lose the last records). Texts are scrubbed of secrets; the raw request
    and response arrive already redacted. With `path=None` nothing is written."""

    def __init__(self, path: str | Path | None, model_id: str) -> None:
        self.model_id = model_id
        self._writer = JsonlWriter(path, fsync=False) if path is not None else None

    def write(
        self,
        key: str,
        stage: str,
        result: GenerateResult | None,
        *,
        attempts: int = 0,
        repair_round: bool = False,
        error: LLMError | None = None,
    ) -> None:
        if self._writer is None:
            return
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": stage,
            "model": self.model_id,
            "key": key,
            "cached": bool(result is not None and result.cached),
            "attempts": attempts,
        }
        if result is not None and result.cached:
            # The full exchange is in the cache entry and in the record of the call that filled it
            # (the cached text was redacted when it was stored).
            record.update(text=result.text, finish_reason=result.finish_reason)
        elif result is not None:
            record.update(
                repair_round=repair_round,
                latency_s=round(result.latency_s, 4),
                input_tokens=result.usage.input_tokens,
                output_tokens=result.usage.output_tokens,
                cost_usd=result.usage.cost_usd,
                finish_reason=result.finish_reason,
                text=scrub(result.text),
                request=result.raw_request,
                response=result.raw_response,
            )
        if error is not None:
            record["error"] = {"type": type(error).__name__, "message": scrub(str(error))}
            if isinstance(error, StructuredOutputError) and error.result is not None:
                record["request"] = error.result.raw_request
                record["response"] = error.result.raw_response
        self._writer.write(record)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
