"""The wire side of provider batches: OpenAI Batch and Anthropic Message Batches through their SDKs.

A backend only moves JSON: request bodies in (built by the provider's `request_body`, exactly what a single
call sends) and result bodies out (parsed later by the provider's `parse_body`). The runner around it
(`caft.llm.batch`) owns state, polling, caching and accounting.

- OpenAI: the requests go up as one JSONL file (`files.create(purpose="batch")`, one line
  `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}` each), then
  `batches.create(input_file_id, endpoint="/v1/chat/completions", completion_window="24h")`. A batch ends in
  `completed`, `failed`, `expired` or `cancelled`; the lines of `output_file_id` carry
  `response.status_code` and `response.body`, those of `error_file_id` an `error.code` (`batch_expired` for
  requests the window did not reach). The batch carries our tag in `metadata`, so a submission whose
  batch id was lost in a crash is found again with `batches.list`.
- Anthropic: `messages.batches.create(requests=[{custom_id, params}])`; `processing_status` becomes
  `ended`; `messages.batches.results(id)` streams one line per request with `result.type` in
  `succeeded` (with `message`), `errored`, `canceled`, `expired`. Batches have no metadata, so a submission
  lost between the create call and the state write cannot be found again (the runner then resubmits it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from caft.errors import ConfigError
from caft.llm.sdk_errors import map_exception
from caft.llm.types import GenerateConfig, GenerateResult, Message, Provider

logger = logging.getLogger(__name__)

ItemKind = Literal["succeeded", "errored", "expired", "canceled", "missing"]


@dataclass
class BatchItem:
    """One request's outcome in a finished batch: a reply body, or why there is none."""

    custom_id: str
    kind: ItemKind
    body: dict[str, Any] | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"custom_id": self.custom_id, "kind": self.kind, "body": self.body, "error": self.error}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BatchItem:
        return cls(str(d["custom_id"]), d["kind"], d.get("body"), str(d.get("error") or ""))


@dataclass
class BatchStatus:
    ended: bool
    status: str
    """The provider's own word (`in_progress`, `completed`, `expired`, `ended`, ...)."""
    counts: dict[str, int] = field(default_factory=dict)


class BatchBackend(Protocol):
    max_requests: int
    """The most requests the provider takes in one batch."""

    async def submit(self, tag: str, items: list[tuple[str, dict[str, Any]]]) -> str:
        """Create one batch of (custom_id, request body); return its id."""
        ...

    async def find(self, tag: str) -> str | None:
        """The id of a batch this client created with `tag`, if the provider can tell."""
        ...

    async def status(self, batch_id: str) -> BatchStatus: ...

    async def fetch(self, batch_id: str) -> list[BatchItem]:
        """Every result line of an ended batch (requests without one are `missing` to the runner)."""
        ...


@runtime_checkable
class BatchCapable(Protocol):
    """A provider whose requests can travel in a batch: the body it would send, and the parser of a reply
    body (OpenAIProvider and AnthropicProvider)."""

    name: str
    key_env: str

    @property
    def model_id(self) -> str: ...

    @property
    def sdk_client(self) -> Any: ...

    def request_body(self, messages: list[Message], config: GenerateConfig) -> dict[str, Any]: ...

    def parse_body(
        self, body: dict[str, Any], messages: list[Message], config: GenerateConfig
    ) -> GenerateResult: ...


class OpenAIBatchBackend:
    max_requests = 50_000
    endpoint = "/v1/chat/completions"

    def __init__(self, provider: BatchCapable) -> None:
        import openai

        self._sdk = openai
        self._provider = provider
        self._client = provider.sdk_client

    def _error(self, e: Exception) -> Exception:
        return map_exception(e, self._sdk, self._provider.model_id, self._provider.key_env)

    async def submit(self, tag: str, items: list[tuple[str, dict[str, Any]]]) -> str:
        lines = [
            json.dumps(
                {"custom_id": cid, "method": "POST", "url": self.endpoint, "body": body}, ensure_ascii=False
            )
            for cid, body in items
        ]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        try:
            uploaded = await self._client.files.create(
                file=(f"caft-batch-{tag}.jsonl", data, "application/jsonl"), purpose="batch"
            )
            batch = await self._client.batches.create(
                input_file_id=uploaded.id,
                endpoint=self.endpoint,
                completion_window="24h",
                metadata={"caft_tag": tag},
            )
        except Exception as e:
            raise self._error(e) from e
        return str(batch.id)

    async def find(self, tag: str) -> str | None:
        try:
            seen = 0
            async for b in self._client.batches.list(limit=100):
                if (b.metadata or {}).get("caft_tag") == tag:
                    return str(b.id)
                seen += 1
                if seen >= 1000:  # the lost batch is among the newest; stop paging through old ones
                    break
        except Exception as e:
            raise self._error(e) from e
        return None

    async def status(self, batch_id: str) -> BatchStatus:
        try:
            b = await self._client.batches.retrieve(batch_id)
        except Exception as e:
            raise self._error(e) from e
        counts = b.request_counts.model_dump() if b.request_counts is not None else {}
        return BatchStatus(b.status in ("completed", "failed", "expired", "cancelled"), str(b.status), counts)

    async def _lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        try:
            content = await self._client.files.content(file_id)
        except Exception as e:
            raise self._error(e) from e
        return [json.loads(line) for line in content.text.splitlines() if line.strip()]

    async def fetch(self, batch_id: str) -> list[BatchItem]:
        try:
            b = await self._client.batches.retrieve(batch_id)
        except Exception as e:
            raise self._error(e) from e
        items: list[BatchItem] = []
        for line in await self._lines(b.output_file_id) + await self._lines(b.error_file_id):
            cid = str(line.get("custom_id", ""))
            response = line.get("response") or {}
            error = line.get("error") or {}
            if response.get("status_code") == 200 and isinstance(response.get("body"), dict):
                items.append(BatchItem(cid, "succeeded", response["body"]))
                continue
            code = str(error.get("code") or "")
            kind: ItemKind = (
                "expired"
                if code == "batch_expired"
                else "canceled"
                if code == "batch_cancelled"
                else "errored"
            )
            body_error = (
                (response.get("body") or {}).get("error") if isinstance(response.get("body"), dict) else None
            )
            message = (
                error.get("message")
                or (body_error or {}).get("message")
                or f"HTTP {response.get('status_code')}"
            )
            items.append(BatchItem(cid, kind, None, f"{code or 'error'}: {message}"))
        if b.status == "failed" and not items:
            # Rejected as a whole (e.g. a malformed line): no result lines, so every request is `missing`
            # and goes the single-call way, which reports the precise error of a bad request.
            reasons = "; ".join(str(e.message) for e in ((b.errors.data or []) if b.errors else []))
            logger.warning(
                "%s: batch %s failed: %s", self._provider.model_id, batch_id, reasons or "no reason given"
            )
        return items


class AnthropicBatchBackend:
    max_requests = 100_000

    def __init__(self, provider: BatchCapable) -> None:
        import anthropic

        self._sdk = anthropic
        self._provider = provider
        self._client = provider.sdk_client

    def _error(self, e: Exception) -> Exception:
        return map_exception(e, self._sdk, self._provider.model_id, self._provider.key_env)

    async def submit(self, tag: str, items: list[tuple[str, dict[str, Any]]]) -> str:  # noqa: ARG002 - no metadata
        try:
            batch = await self._client.messages.batches.create(
                requests=[{"custom_id": cid, "params": body} for cid, body in items]
            )
        except Exception as e:
            raise self._error(e) from e
        return str(batch.id)

    async def find(self, tag: str) -> str | None:  # noqa: ARG002 - message batches carry no metadata
        return None

    async def status(self, batch_id: str) -> BatchStatus:
        try:
            b = await self._client.messages.batches.retrieve(batch_id)
        except Exception as e:
            raise self._error(e) from e
        return BatchStatus(
            b.processing_status == "ended", str(b.processing_status), b.request_counts.model_dump()
        )

    async def fetch(self, batch_id: str) -> list[BatchItem]:
        items: list[BatchItem] = []
        try:
            async for line in await self._client.messages.batches.results(batch_id):
                result = line.result
                if result.type == "succeeded":
                    items.append(
                        BatchItem(line.custom_id, "succeeded", result.message.model_dump(mode="json"))
                    )
                elif result.type == "errored":
                    err = getattr(result.error, "error", None)
                    message = getattr(err, "message", "") or str(result.error)
                    items.append(
                        BatchItem(
                            line.custom_id, "errored", None, f"{getattr(err, 'type', 'error')}: {message}"
                        )
                    )
                else:
                    why = (
                        "the batch expired before it ran"
                        if result.type == "expired"
                        else "the batch was canceled"
                    )
                    items.append(BatchItem(line.custom_id, result.type, None, why))
        except Exception as e:
            raise self._error(e) from e
        return items


def batchable(provider: Provider) -> BatchCapable:
    """`provider` as a batch-capable one; a ConfigError for providers without a batch API."""
    if supports_batch(provider) and isinstance(provider, BatchCapable):
        return provider
    raise ConfigError(
        f"{provider.model_id} has no batch API in caft (only openai/ and anthropic/ models do); "
        "send the requests one by one (LLMClient.generate_many) instead"
    )


def supports_batch(provider: Provider) -> bool:
    """openai/ and anthropic/ models (compatible servers such as vLLM or Ollama have no batch endpoints)."""
    return provider.name in ("openai", "anthropic")


def batch_backend(provider: BatchCapable) -> BatchBackend:
    if provider.name == "openai":
        return OpenAIBatchBackend(provider)
    return AnthropicBatchBackend(provider)
