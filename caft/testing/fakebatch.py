"""The batch endpoints of the fake LLM server (`caft.testing.fakellm.FakeLLM`), in the real wire formats.

OpenAI: ``POST /v1/files`` (multipart upload, purpose ``batch``), ``GET /v1/files/{id}`` and
``/v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (list).
Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches/{id}``, ``GET .../{id}/results``.

Each batched request is answered exactly as the same single request would be (the fake's rules, script,
callable and default, and the same reply builders), when the batch is created; the batch reports itself
ended `FakeLLM.batch.delay_s` seconds later. `FakeLLM.batch.fail` (a matcher, as for rules) makes matching
items fail (OpenAI: an error-file line with a 500 response; Anthropic: an `errored` result), and
`FakeLLM.batch.expire` makes matching items miss the window (OpenAI: the batch ends `expired` and they are
in the error file with code `batch_expired`; Anthropic: `expired` results). An injected fault or an unscripted
request becomes a failed item too.

Counted: `FakeLLM.batch_requests` (every batched request, as `RecordedRequest`s) and
`FakeLLM.batches_created`; `/_fake/stats` reports both, for a server in another process.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from caft.testing.fakellm import FakeLLM, Matcher, _Handler


@dataclass
class BatchBehaviour:
    delay_s: float = 0.0
    """Seconds from creation until a batch reports itself ended."""
    fail: Matcher = None
    """Items whose prompt matches fail (None: none do)."""
    expire: Matcher = None
    """Items whose prompt matches expire unprocessed (None: none do)."""


@dataclass
class _Item:
    custom_id: str
    outcome: Literal["succeeded", "errored", "expired"]
    body: dict[str, Any] | None = None
    error: str = ""


@dataclass
class _Batch:
    id: str
    api: Literal["openai", "anthropic"]
    created: float
    items: list[_Item]
    delay_s: float
    input_file_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None

    def ended(self) -> bool:
        return time.time() - self.created >= self.delay_s


class FakeBatches:
    """The files and batches of one fake server (thread-safe)."""

    def __init__(self, fake: FakeLLM) -> None:
        self.fake = fake
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def reset(self) -> None:
        with self._lock:
            self.files.clear()
            self.batches.clear()

    def end_all(self) -> None:
        with self._lock:
            for b in self.batches.values():
                b.delay_s = 0.0

    # -- routing (called from the fake's request handler) -----------------------------------------------

    def handle(self, h: _Handler, method: str, raw: bytes) -> bool:
        """Answer the request if it is a batch route; False otherwise."""
        path = h.path.split("?", 1)[0].rstrip("/")
        parts = path.split("/")
        if method == "POST" and path == "/v1/files":
            self._upload(h, raw)
        elif method == "GET" and len(parts) == 4 and parts[2] == "files":
            self._file_object(h, parts[3])
        elif method == "GET" and len(parts) == 5 and parts[2] == "files" and parts[4] == "content":
            self._file_content(h, parts[3])
        elif method == "POST" and path == "/v1/batches":
            self._create_openai(h, raw)
        elif method == "GET" and path == "/v1/batches":
            with self._lock:
                batches = [b for b in self.batches.values() if b.api == "openai"]
            data = [self._openai_batch(b) for b in reversed(batches)]
            h._send_json(200, {"object": "list", "data": data, "has_more": False})
        elif method == "GET" and len(parts) == 4 and parts[2] == "batches":
            self._get(h, parts[3], "openai")
        elif method == "POST" and path == "/v1/messages/batches":
            self._create_anthropic(h, raw)
        elif method == "GET" and len(parts) == 5 and parts[2:4] == ["messages", "batches"]:
            self._get(h, parts[4], "anthropic")
        elif (
            method == "GET"
            and len(parts) == 6
            and parts[2:4] == ["messages", "batches"]
            and parts[5] == "results"
        ):
            self._anthropic_results(h, parts[4])
        else:
            return False
        return True

    # -- answering the items ------------------------------------------------------------------------------

    def _answer(
        self, h: _Handler, custom_id: str, body: dict[str, Any], api: Literal["openai", "anthropic"]
    ) -> _Item:
        from caft.testing.fakescript import Fault, RecordedRequest, Reply, _matches

        path = "/v1/chat/completions" if api == "openai" else "/v1/messages"
        req = RecordedRequest(path, dict(h.headers.items()), body, api, time.time())
        fake = self.fake
        with fake._lock:
            fake.batch_requests.append(req)
        if fake.batch.expire is not None and _matches(fake.batch.expire, req):
            return _Item(custom_id, "expired")
        if fake.batch.fail is not None and _matches(fake.batch.fail, req):
            return _Item(custom_id, "errored", error="fakellm: scripted batch item failure")
        reply = fake._resolve(req)
        if reply is None:
            return _Item(custom_id, "errored", error=f"fakellm: no scripted reply for: {req.prompt[:200]}")
        if isinstance(reply, Fault):
            return _Item(custom_id, "errored", error=f"fakellm: injected {reply.kind}")
        as_reply = reply if isinstance(reply, Reply) else Reply(text=reply)
        payload = h._openai(req, as_reply) if api == "openai" else h._anthropic(req, as_reply)
        return _Item(custom_id, "succeeded", payload)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    def _register(self, batch: _Batch) -> None:
        with self._lock:
            self.batches[batch.id] = batch
        with self.fake._lock:
            self.fake.batches_created += 1

    # -- OpenAI -------------------------------------------------------------------------------------------

    def _upload(self, h: _Handler, raw: bytes) -> None:
        ctype = h.headers.get("Content-Type", "")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + raw
        )
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            fields[str(name)] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
        if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"batch":
            h._send_json(400, {"error": {"message": "fakellm: upload needs a file and purpose=batch"}})
            return
        file_id = self._new_id("file-fake")
        with self._lock:
            self.files[file_id] = fields["file"][1]
        h._send_json(200, self._file_json(file_id, fields["file"][0] or "upload.jsonl"))

    def _file_json(self, file_id: str, filename: str = "batch.jsonl") -> dict[str, Any]:
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(self.files.get(file_id, b"")),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": "batch",
            "status": "processed",
        }

    def _file_object(self, h: _Handler, file_id: str) -> None:
        if file_id not in self.files:
            h._send_json(404, {"error": {"message": f"fakellm: no file {file_id}"}})
            return
        h._send_json(200, self._file_json(file_id))

    def _file_content(self, h: _Handler, file_id: str) -> None:
        with self._lock:
            data = self.files.get(file_id)
        if data is None:
            h._send_json(404, {"error": {"message": f"fakellm: no file {file_id}"}})
            return
        h._send_bytes(200, data, "application/octet-stream")

    def _create_openai(self, h: _Handler, raw: bytes) -> None:
        body = json.loads(raw or b"{}")
        with self._lock:
            data = self.files.get(str(body.get("input_file_id")))
        if data is None or body.get("endpoint") != "/v1/chat/completions":
            h._send_json(400, {"error": {"message": "fakellm: unknown input file or endpoint"}})
            return
        items = []
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                items.append(self._answer(h, entry["custom_id"], entry["body"], "openai"))
        batch = _Batch(
            self._new_id("batch_fake"),
            "openai",
            time.time(),
            items,
            self.fake.batch.delay_s,
            input_file_id=str(body["input_file_id"]),
            metadata=dict(body.get("metadata") or {}),
        )
        self._register(batch)
        h._send_json(200, self._openai_batch(batch))

    def _finish_openai(self, b: _Batch) -> None:
        """Write the output and error files once the batch has ended."""
        if b.output_file_id is not None or not b.ended():
            return
        out, err = [], []
        for n, it in enumerate(b.items):
            line: dict[str, Any] = {"id": f"batch_req_{b.id}_{n}", "custom_id": it.custom_id}
            if it.outcome == "succeeded":
                out.append(
                    {
                        **line,
                        "response": {"status_code": 200, "request_id": f"req_{n}", "body": it.body},
                        "error": None,
                    }
                )
            elif it.outcome == "errored":
                error = {"error": {"message": it.error, "type": "server_error", "code": None}}
                err.append(
                    {
                        **line,
                        "response": {"status_code": 500, "request_id": f"req_{n}", "body": error},
                        "error": None,
                    }
                )
            else:
                message = "This request could not be executed before the completion window expired."
                err.append({**line, "response": None, "error": {"code": "batch_expired", "message": message}})
        with self._lock:
            b.output_file_id = self._new_id("file-fake")
            self.files[b.output_file_id] = "".join(json.dumps(x) + "\n" for x in out).encode()
            if err:
                b.error_file_id = self._new_id("file-fake")
                self.files[b.error_file_id] = "".join(json.dumps(x) + "\n" for x in err).encode()

    def _openai_batch(self, b: _Batch) -> dict[str, Any]:
        self._finish_openai(b)
        ended = b.ended()
        expired = any(it.outcome == "expired" for it in b.items)
        status = ("expired" if expired else "completed") if ended else "in_progress"
        done = sum(it.outcome == "succeeded" for it in b.items) if ended else 0
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": status,
            "created_at": int(b.created),
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "completed_at": int(time.time()) if ended and not expired else None,
            "expired_at": int(time.time()) if ended and expired else None,
            "metadata": b.metadata,
            "request_counts": {
                "total": len(b.items),
                "completed": done,
                "failed": len(b.items) - done if ended else 0,
            },
        }

    # -- Anthropic ------------------------------------------------------------------------------------------

    def _create_anthropic(self, h: _Handler, raw: bytes) -> None:
        body = json.loads(raw or b"{}")
        items = [self._answer(h, r["custom_id"], r["params"], "anthropic") for r in body.get("requests", [])]
        batch = _Batch(
            self._new_id("msgbatch_fake"), "anthropic", time.time(), items, self.fake.batch.delay_s
        )
        self._register(batch)
        h._send_json(200, self._anthropic_batch(h, batch))

    def _anthropic_batch(self, h: _Handler, b: _Batch) -> dict[str, Any]:
        ended = b.ended()
        created = datetime.fromtimestamp(b.created, tz=timezone.utc)
        counts = {
            "processing": 0 if ended else len(b.items),
            "succeeded": 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        }
        if ended:
            for it in b.items:
                counts[it.outcome] += 1
        host = h.headers.get("Host", "127.0.0.1")
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": counts,
            "created_at": created.isoformat(),
            "expires_at": (created + timedelta(hours=24)).isoformat(),
            "ended_at": datetime.now(tz=timezone.utc).isoformat() if ended else None,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"http://{host}/v1/messages/batches/{b.id}/results" if ended else None,
        }

    def _anthropic_results(self, h: _Handler, batch_id: str) -> None:
        b = self.batches.get(batch_id)
        if b is None or b.api != "anthropic" or not b.ended():
            h._send_json(
                404, {"type": "error", "error": {"type": "not_found_error", "message": "no results"}}
            )
            return
        lines = []
        for it in b.items:
            if it.outcome == "succeeded":
                result: dict[str, Any] = {"type": "succeeded", "message": it.body}
            elif it.outcome == "errored":
                result = {
                    "type": "errored",
                    "error": {"type": "error", "error": {"type": "api_error", "message": it.error}},
                }
            else:
                result = {"type": "expired"}
            lines.append(json.dumps({"custom_id": it.custom_id, "result": result}))
        data = ("\n".join(lines) + "\n").encode()
        h._send_bytes(200, data, "application/binary")

    def _get(self, h: _Handler, batch_id: str, api: Literal["openai", "anthropic"]) -> None:
        with self._lock:
            b = self.batches.get(batch_id)
        if b is None or b.api != api:
            h._error(api, 404, "not_found_error", f"fakellm: no batch {batch_id}")
            return
        h._send_json(200, self._openai_batch(b) if api == "openai" else self._anthropic_batch(h, b))
