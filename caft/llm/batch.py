"""Many requests through a provider's batch API (OpenAI Batch, Anthropic Message Batches), resumable.

    results = await run_batch(client, [(messages, config), ...], state_dir)   # input order, like generate_many

Each request is what `client.generate` would send (the provider's own `request_body`: logprobs, temperature,
token limit, structured output, tools) and its reply is parsed as `generate` parses one, so a batched
result equals the single-call result. Around the batch:

- the cache: a request `generate` would answer from the cache is not submitted; batched replies are written
  to the cache under the same key as single calls (`caft.llm.cache.cache_key`);
- state: before anything is sent, `state_dir/batch_state.json` records each submission's custom_id ->
  request mapping (atomic write); the batch id is written as soon as the provider returns it, before polling.
  A rerun after a crash or a kill -9 at any point polls the same batches and never resubmits a request
  already submitted. (The one window: a kill between the provider creating the batch and the id reaching
  disk. OpenAI batches carry a tag in their metadata and are found again; Anthropic ones are resubmitted.)
  Fetched results go to `state_dir/results-<tag>.jsonl` before they are used, so a later rerun replays them
  (counted as cache hits, no money) instead of downloading again;
- polling with backoff (`poll_initial_s`, times `poll_factor` per round, at most `poll_max_s`); past
  `max_wait_s` a `BatchPendingError` says to rerun later (nothing is lost);
- failures: an errored, expired, canceled or missing item, or a reply that does not validate against the
  response model, is sent again one by one through `client.generate_many` (the single-call path, its
  retries and its repair round); with `retry_failed=False` the item gets an `LLMError` in its slot;
- cost: batched replies are accounted at the model's batch price (`Price.batch()`: the table's batch
  prices, or `BATCH_DISCOUNT` of the standard ones); single-call retries at the standard price.

Identical temperature-0 requests are submitted once and share the reply; identical sampled requests each
get their own custom_id (the n-th copy of a request keeps its identity across reruns).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caft.errors import ConfigError
from caft.llm import structured
from caft.llm.batch_backends import (
    BatchBackend,
    BatchCapable,
    BatchItem,
    BatchStatus,
    batch_backend,
    batchable,
    supports_batch,
)
from caft.llm.cache import cache_key, is_deterministic
from caft.llm.client import LLMClient, Request, ResultOrError
from caft.llm.prices import Price, find_price
from caft.llm.types import BudgetExceededError, FatalError, GenerateResult, LLMError, RetryableError
from caft.rundir import atomic_write_json, atomic_write_text, read_jsonl

logger = logging.getLogger(__name__)

STATE_FILE = "batch_state.json"
STATE_VERSION = 1

__all__ = ["STATE_FILE", "BatchPendingError", "BatchProgress", "generate_all", "run_batch", "supports_batch"]


class BatchPendingError(LLMError):
    """The batch has not ended within `max_wait_s`; rerun with the same state_dir to go on polling."""


@dataclass
class BatchProgress:
    """What `on_status` is told after each poll round."""

    pending_batches: int
    status: dict[str, BatchStatus]
    elapsed_s: float


@dataclass
class _Submission:
    tag: str
    custom_ids: dict[str, str]
    """custom_id -> request identity (cache key, and `#n` for the n-th copy of a sampled request)."""
    batch_id: str | None = None
    state: str = "submitting"
    """`submitting` (ids on disk, no batch id yet), `running`, `fetched` (results on disk)."""
    created: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "batch_id": self.batch_id,
            "state": self.state,
            "created": self.created,
            "custom_ids": self.custom_ids,
        }


class _State:
    def __init__(self, state_dir: Path, model_id: str, base_url: str | None) -> None:
        self.dir = state_dir
        self.path = state_dir / STATE_FILE
        self.model_id = model_id
        self.base_url = base_url
        self.submissions: list[_Submission] = []
        if self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("model") != model_id or data.get("base_url") != base_url:
                raise ConfigError(
                    f"{self.path} belongs to batches of {data.get('model')} at {data.get('base_url')}, not "
                    f"{model_id} at {base_url}; use another state folder for this model"
                )
            for s in data.get("submissions", []):
                self.submissions.append(
                    _Submission(
                        s["tag"], dict(s["custom_ids"]), s.get("batch_id"), s["state"], s.get("created", 0.0)
                    )
                )

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.path,
            {
                "version": STATE_VERSION,
                "model": self.model_id,
                "base_url": self.base_url,
                "submissions": [s.to_json() for s in self.submissions],
            },
        )

    def results_path(self, sub: _Submission) -> Path:
        return self.dir / f"results-{sub.tag}.jsonl"

    def submitted(self) -> set[str]:
        return {ident for s in self.submissions for ident in s.custom_ids.values()}


def _identities(client: LLMClient, requests: Sequence[Request]) -> list[str]:
    p = client.provider
    seen: dict[str, int] = {}
    out: list[str] = []
    for messages, config in requests:
        key = cache_key(p.name, p.model, p.base_url, messages, config)
        if is_deterministic(config):
            out.append(key)
            continue
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append(f"{key}#{n}")
    return out


async def run_batch(
    client: LLMClient,
    requests: Sequence[Request],
    state_dir: str | Path,
    *,
    stage: str | None = None,
    poll_initial_s: float = 15.0,
    poll_max_s: float = 300.0,
    poll_factor: float = 1.5,
    max_wait_s: float | None = None,
    max_batch_requests: int | None = None,
    retry_failed: bool = True,
    on_status: Callable[[BatchProgress], None] | None = None,
    on_result: Callable[[int, ResultOrError], None] | None = None,
) -> list[ResultOrError]:
    """Every request's result in input order (an `LLMError` in the slot of one that failed), through the
    provider's batch API; see the module docstring. `FatalError` and `BudgetExceededError` are raised
    (`client.max_cost_usd` is checked once, before submitting: a batch's cost is known only at its end).
    `on_status` hears each poll round; `on_result(index, result)` is called for every request, in order,
    once all are known (as `generate_many` calls it, so a caller can append rows the same way)."""
    runner = _Runner(client, list(requests), Path(state_dir), stage, retry_failed)
    results = await runner.run(
        poll_initial_s, poll_max_s, poll_factor, max_wait_s, max_batch_requests, on_status
    )
    if on_result is not None:
        for i, res in enumerate(results):
            on_result(i, res)
    return results


async def generate_all(
    client: LLMClient,
    requests: Sequence[Request],
    *,
    batch: bool,
    state_dir: str | Path | None = None,
    stage: str | None = None,
    on_result: Callable[[int, ResultOrError], None] | None = None,
    **batch_options: Any,
) -> list[ResultOrError]:
    """`run_batch` when `batch` is set and the provider has a batch API, else `client.generate_many`
    (same result list, same `on_result` calls). `state_dir` is required for batches."""
    if batch and supports_batch(client.provider):
        if state_dir is None:
            raise ConfigError("a provider batch needs a state folder (state_dir) to resume from")
        return await run_batch(client, requests, state_dir, stage=stage, on_result=on_result, **batch_options)
    if batch:
        logger.warning("%s has no batch API; sending the requests one by one", client.model_id)
    return await client.generate_many(requests, stage=stage, on_result=on_result)


class _Runner:
    def __init__(
        self,
        client: LLMClient,
        requests: list[Request],
        state_dir: Path,
        stage: str | None,
        retry_failed: bool,
    ) -> None:
        self.client = client
        self.requests = requests
        self.stage = stage
        self.retry_failed = retry_failed
        self.provider: BatchCapable = batchable(client.provider)
        self.backend: BatchBackend = batch_backend(self.provider)
        p = client.provider
        self.state = _State(state_dir, p.model_id, p.base_url)
        price = find_price(client.prices, p.name, p.model)
        self.price: Price | None = price.batch() if price is not None else None
        self.idents = _identities(client, requests)
        self.index: dict[str, int] = {}
        for i, ident in enumerate(self.idents):
            self.index.setdefault(ident, i)
        self.done: dict[str, ResultOrError] = {}
        self.retry: dict[str, str] = {}
        """identity -> why it goes through the single-call path."""

    # -- the steps ------------------------------------------------------------------------------------

    async def run(
        self,
        poll_initial_s: float,
        poll_max_s: float,
        poll_factor: float,
        max_wait_s: float | None,
        max_batch_requests: int | None,
        on_status: Callable[[BatchProgress], None] | None,
    ) -> list[ResultOrError]:
        for ident, i in self.index.items():
            try:
                self.client.check(*self.requests[i])
            except (FatalError, BudgetExceededError):
                raise
            except LLMError as e:
                self.done[ident] = e
        for sub in self.state.submissions:
            if sub.state == "fetched":
                self._use(sub, self._read_results(sub), replayed=True)
        await self._submit_new(max_batch_requests or self.backend.max_requests)
        await self._poll(poll_initial_s, poll_max_s, poll_factor, max_wait_s, on_status)
        await self._retry_singly()
        return [self.done[ident] for ident in self.idents]

    async def _submit_new(self, max_requests: int) -> None:
        for sub in self.state.submissions:
            if sub.state == "submitting":  # a crash after the ids were written: find the batch or send it
                sub.batch_id = await self.backend.find(sub.tag)
                if sub.batch_id is None:
                    logger.info("batch %s was not found at the provider; submitting it", sub.tag)
                    await self._send(sub)
                else:
                    sub.state = "running"
                    self.state.save()
        submitted = self.state.submitted()
        todo: list[str] = []
        for ident, i in self.index.items():
            if ident in self.done or ident in submitted:
                continue
            messages, config = self.requests[i]
            hit = self.client.lookup(messages, config, stage=self.stage)
            if hit is not None:
                self.done[ident] = hit
            else:
                todo.append(ident)
        for start in range(0, len(todo), max_requests):
            tag = uuid.uuid4().hex[:16]
            chunk = todo[start : start + max_requests]
            sub = _Submission(
                tag, {f"{tag}-{j}": ident for j, ident in enumerate(chunk)}, created=time.time()
            )
            self.state.submissions.append(sub)
            self.state.save()  # the mapping is on disk before the provider hears of it
            await self._send(sub)

    async def _send(self, sub: _Submission) -> None:
        items = []
        for cid, ident in sub.custom_ids.items():
            messages, config = self.requests[self._request_index(ident)]
            items.append((cid, self.provider.request_body(messages, config)))
        sub.batch_id = await self.backend.submit(sub.tag, items)
        sub.state = "running"
        self.state.save()
        logger.info("%s: submitted batch %s (%d requests)", self.client.model_id, sub.batch_id, len(items))

    def _request_index(self, ident: str) -> int:
        i = self.index.get(ident)
        if i is None:
            raise ConfigError(
                f"{self.state.path} holds a request that is not among the requests given; rerun with the same "
                "requests or use a fresh state folder"
            )
        return i

    async def _poll(
        self,
        initial: float,
        max_interval: float,
        factor: float,
        max_wait_s: float | None,
        on_status: Callable[[BatchProgress], None] | None,
    ) -> None:
        t0 = time.monotonic()
        interval = initial
        while True:
            running = [s for s in self.state.submissions if s.state == "running"]
            statuses: dict[str, BatchStatus] = {}
            for sub in running:
                assert sub.batch_id is not None
                try:
                    st = statuses[sub.batch_id] = await self.backend.status(sub.batch_id)
                    items = await self.backend.fetch(sub.batch_id) if st.ended else None
                except RetryableError as e:  # a transient error while polling: try again next round
                    logger.info("%s: polling batch %s failed (%s)", self.client.model_id, sub.batch_id, e)
                    continue
                if items is not None:
                    atomic_write_text(
                        self.state.results_path(sub),
                        "".join(json.dumps(it.to_json(), ensure_ascii=False) + "\n" for it in items),
                    )
                    sub.state = "fetched"
                    self.state.save()
                    self._use(sub, items, replayed=False)
            pending = [s for s in self.state.submissions if s.state == "running"]
            elapsed = time.monotonic() - t0
            if on_status is not None and running:
                on_status(BatchProgress(len(pending), statuses, elapsed))
            if not pending:
                return
            if max_wait_s is not None and elapsed + interval > max_wait_s:
                ids = ", ".join(str(s.batch_id) for s in pending)
                raise BatchPendingError(
                    f"{self.client.model_id}: batch(es) {ids} still running after {elapsed:.0f} s; rerun with "
                    f"the same state folder ({self.state.dir}) to go on polling (nothing is resubmitted)"
                )
            await asyncio.sleep(interval)
            interval = min(interval * factor, max_interval)

    def _read_results(self, sub: _Submission) -> list[BatchItem]:
        path = self.state.results_path(sub)
        return [BatchItem.from_json(d) for d in read_jsonl(path)] if path.exists() else []

    def _use(self, sub: _Submission, items: list[BatchItem], *, replayed: bool) -> None:
        """Parse, validate, account and cache the replies of one ended batch; queue the rest for retry."""
        by_cid = {it.custom_id: it for it in items}
        for cid, ident in sub.custom_ids.items():
            if ident not in self.index or ident in self.done:
                continue
            item = by_cid.get(cid) or BatchItem(cid, "missing", None, "no result line for this request")
            if item.kind != "succeeded" or item.body is None:
                self.retry[ident] = f"{item.kind}: {item.error}"
                continue
            messages, config = self.requests[self.index[ident]]
            try:
                result: GenerateResult = self.provider.parse_body(item.body, messages, config)
            except RetryableError as e:
                self.retry[ident] = str(e)
                continue
            if config.response_model is not None:
                parsed, err = structured.validate(config.response_model, result.text)
                if parsed is None:  # the single-call path has the repair round
                    self.retry[ident] = f"reply did not validate: {err}"
                    continue
                result = result.model_copy(update={"parsed": parsed})
            self.done[ident] = self.client.record(
                messages, config, result, stage=self.stage, price=self.price, replayed=replayed
            )

    async def _retry_singly(self) -> None:
        todo = [ident for ident in self.retry if ident not in self.done]
        if not todo:
            return
        if not self.retry_failed:
            for ident in todo:
                self.done[ident] = RetryableError(
                    f"{self.client.model_id}: batch item failed ({self.retry[ident]})"
                )
            return
        logger.info("%s: %d batch item(s) failed; sending them one by one", self.client.model_id, len(todo))
        results = await self.client.generate_many(
            [self.requests[self.index[i]] for i in todo], stage=self.stage
        )
        for ident, res in zip(todo, results, strict=True):
            self.done[ident] = res
