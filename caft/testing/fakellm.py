"""A fake LLM server that speaks the real wire formats, for tests and benchmarks (no network, no keys).

It is a threaded HTTP server on 127.0.0.1 (a random free port) answering

- ``POST /v1/chat/completions`` in the OpenAI format: text, JSON-schema / JSON-mode replies, ``logprobs`` with
  ``top_logprobs``, ``tool_calls``, ``usage``;
- ``POST /v1/messages`` in the Anthropic format: text and ``tool_use`` blocks (a forced tool gets the reply's
  JSON as its input), ``usage``;
- the batch APIs: OpenAI ``/v1/files`` + ``/v1/batches`` and Anthropic ``/v1/messages/batches``, each batched
  request answered as the single request would be (``caft.testing.fakebatch``; ``fake.batch`` sets the delay,
  failing and expiring items; ``fake.batch_requests`` and ``fake.batches_created`` count what was submitted).

Point the real SDK clients at it: ``AsyncOpenAI(base_url=fake.openai_base_url)``,
``AsyncAnthropic(base_url=fake.anthropic_base_url)``, or through caft:
``get_provider("openai/gpt-4.1", base_url=fake.openai_base_url)``.

Usage::

    with FakeLLM(latency_s=0.05) as fake:
        fake.add_rule("capital of France", "Paris")              # prompt substring -> reply
        fake.add_rule(re.compile(r"rate .* 0-100"), Reply(text="7", top_logprobs={"7": -0.1, "8": -2.5}))
        fake.reply_in_order("first", Reply(json={"score": 3}))   # consumed in order when no rule matches
        fake.on_request(lambda req: f"echo {req.prompt}")        # a callable, last resort before `default`
        fake.inject("429", times=2, retry_after=0.2)             # the next 2 requests get 429 + Retry-After
        fake.inject("hang", hang_s=5.0)                          # holds the connection without replying
        ...
        assert len(fake.requests) == 3 and fake.max_in_flight <= 8

Resolution of one request: a pending injected fault (optionally only for prompts matching ``match``), then the
first rule whose matcher fits and whose ``times`` is not used up, then the in-order script, then the
``on_request`` callable, then ``default``. With none of these the server answers HTTP 400 "no scripted reply",
which the client treats as fatal, so a test with a missing script fails loudly instead of getting a default.

Rules match on ``RecordedRequest.prompt``: every message's text (system prompt included) joined by newlines.
A matcher is a substring, a compiled regex (``search``), or a callable ``(RecordedRequest) -> bool``. A reply is a
``str``, a ``Reply``, a ``Fault``, or a callable ``(RecordedRequest) -> str | Reply | Fault``.

Faults (``inject(kind, ...)`` or ``Fault(kind, ...)`` as a reply): ``"429"`` (with ``Retry-After`` when
``retry_after`` is given), ``"500"``, ``"503"``, ``"400"``, ``"401"``, ``"403"``, ``"404"``; ``"hang"`` (no reply for
``hang_s`` seconds, then the connection is closed); ``"malformed"`` (200 with a body that is not JSON);
``"truncated"`` (200 whose body stops halfway, shorter than its Content-Length).

What it records: ``requests`` (every request, faulted ones included: path, headers, parsed body, api, time),
``in_flight`` and ``max_in_flight`` (concurrent requests being handled, latency included), ``count(match)``.
``reset()`` clears records, rules, the script, faults and the ``on_request`` callable (``default`` stays).
``GET /_fake/stats`` returns the request count and in-flight figures as JSON, for a server running in another
process.

Run it as its own process (so that its threads do not share the client's GIL, as in the benchmark)::

    python tests/fakellm.py --latency 0.2 --text 7 --top-logprobs 21
    # prints "READY http://127.0.0.1:PORT" and serves until stdin closes or it is terminated
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from caft.testing.fakebatch import BatchBehaviour, FakeBatches
from caft.testing.fakescript import Fault as Fault
from caft.testing.fakescript import FaultKind as FaultKind
from caft.testing.fakescript import Matcher as Matcher
from caft.testing.fakescript import RecordedRequest as RecordedRequest
from caft.testing.fakescript import Reply as Reply
from caft.testing.fakescript import ReplyLike, Responder, _matches, _Rule, _words


class FakeLLM:
    """See the module docstring."""

    def __init__(self, latency_s: float = 0.0, default: Responder | None = None) -> None:
        self.latency_s = latency_s
        self.default = default
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._rules: list[_Rule] = []
        self._script: deque[Responder] = deque()
        self._callable: Callable[[RecordedRequest], ReplyLike] | None = None
        self._faults: deque[tuple[Fault, Matcher]] = deque()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.batch = BatchBehaviour()
        self.batch_requests: list[RecordedRequest] = []
        self.batches_created = 0
        self._batches = FakeBatches(self)

    # -- scripting -----------------------------------------------------------------------------------

    def add_rule(self, match: Matcher, reply: Responder, times: int | None = None) -> FakeLLM:
        with self._lock:
            self._rules.append(_Rule(match, reply, times))
        return self

    def reply_in_order(self, *replies: Responder) -> FakeLLM:
        with self._lock:
            self._script.extend(replies)
        return self

    def on_request(self, fn: Callable[[RecordedRequest], ReplyLike]) -> FakeLLM:
        self._callable = fn
        return self

    def inject(
        self,
        kind: FaultKind,
        times: int = 1,
        retry_after: float | None = None,
        hang_s: float = 30.0,
        match: Matcher = None,
    ) -> FakeLLM:
        with self._lock:
            for _ in range(times):
                self._faults.append((Fault(kind, retry_after=retry_after, hang_s=hang_s), match))
        return self

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._rules.clear()
            self._script.clear()
            self._faults.clear()
            self._callable = None
            self.in_flight = 0
            self.max_in_flight = 0
            self.batch_requests.clear()
            self.batches_created = 0
            self.batch = BatchBehaviour()
        self._batches.reset()

    def end_batches(self) -> None:
        """Every batch created so far reports itself ended from now on (whatever `batch.delay_s` said)."""
        self._batches.end_all()

    def count(self, match: Matcher = None) -> int:
        """Requests seen so far whose prompt matches."""
        with self._lock:
            reqs = list(self.requests)
        return sum(1 for r in reqs if _matches(match, r))

    # -- server --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeLLM is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    def start(self) -> FakeLLM:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        server = _Server(("127.0.0.1", 0), Handler)
        self._server = server
        self._release.clear()
        self._thread = threading.Thread(target=server.serve_forever, name="fakellm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()  # frees handlers stuck in a "hang"
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (server threads) -----------------------------------------------------------

    def _resolve(self, req: RecordedRequest) -> ReplyLike | None:
        with self._lock:
            for i, (fault, matcher) in enumerate(self._faults):
                if _matches(matcher, req):
                    del self._faults[i]
                    return fault
            for rule in self._rules:
                if (rule.times is None or rule.times > 0) and _matches(rule.matcher, req):
                    if rule.times is not None:
                        rule.times -= 1
                    chosen: Responder | None = rule.reply
                    break
            else:
                chosen = self._script.popleft() if self._script else None
        if chosen is None:
            chosen = self._callable if self._callable is not None else self.default
        if chosen is None:
            return None
        if callable(chosen):
            return chosen(req)
        return chosen

    def _next_id(self) -> int:
        return next(self._ids)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # many clients connect at once in the concurrency tests

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that goes away mid-request (killed in the crash-resume tests) is expected, not an error."""
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_fake: FakeLLM

    def log_message(self, format: str, *args: Any) -> None:  # noqa: ARG002 (silences the stdlib request log)
        return

    def do_GET(self) -> None:
        if self.server_fake._batches.handle(self, "GET", b""):
            return
        if self.path.rstrip("/") != "/_fake/stats":
            self._send_json(404, {"error": {"message": f"fakellm: no route {self.path}"}})
            return
        fake = self.server_fake
        with fake._lock:
            stats = {
                "requests": len(fake.requests),
                "in_flight": fake.in_flight,
                "max_in_flight": fake.max_in_flight,
                "batch_requests": len(fake.batch_requests),
                "batches_created": fake.batches_created,
            }
        self._send_json(200, stats)

    def do_POST(self) -> None:
        fake = self.server_fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if fake._batches.handle(self, "POST", raw):
            return
        if self.path.rstrip("/").endswith("/chat/completions"):
            api: Literal["openai", "anthropic"] = "openai"
        elif self.path.rstrip("/").endswith("/messages"):
            api = "anthropic"
        else:
            self._send_json(404, {"error": {"message": f"fakellm: no route {self.path}"}})
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send_json(400, {"error": {"message": "fakellm: request body is not JSON"}})
            return
        req = RecordedRequest(self.path, dict(self.headers.items()), body, api, time.time())
        with fake._lock:
            fake.requests.append(req)
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            reply = fake._resolve(req)
            latency = reply.latency_s if isinstance(reply, Reply) and reply.latency_s is not None else None
            delay = fake.latency_s if latency is None else latency
            if delay > 0 and not (isinstance(reply, Fault) and reply.kind == "hang"):
                time.sleep(delay)
            if reply is None:
                self._error(
                    api, 400, "invalid_request_error", f"fakellm: no scripted reply for: {req.prompt[:200]}"
                )
            elif isinstance(reply, Fault):
                self._fault(api, reply)
            else:
                as_reply = reply if isinstance(reply, Reply) else Reply(text=reply)
                payload = self._openai(req, as_reply) if api == "openai" else self._anthropic(req, as_reply)
                self._send_json(200, payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its timeout); nothing to answer
        finally:
            with fake._lock:
                fake.in_flight -= 1

    # -- responses -----------------------------------------------------------------------------------

    def _send_bytes(
        self,
        status: int,
        data: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        *,
        cut: int | None = None,
    ) -> None:
        """Content-Length is len(data); `cut` sends only the first `cut` bytes (a truncated reply)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data if cut is None else data[:cut])
        self.wfile.flush()

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(payload).encode("utf-8"), headers=headers)

    def _error(
        self, api: str, status: int, kind: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        if api == "openai":
            payload: dict[str, Any] = {"error": {"message": message, "type": kind, "code": None}}
        else:
            payload = {"type": "error", "error": {"type": kind, "message": message}}
        self._send_json(status, payload, headers)

    def _fault(self, api: str, fault: Fault) -> None:
        kinds = {
            "429": "rate_limit_error",
            "500": "api_error",
            "503": "overloaded_error",
            "400": "invalid_request_error",
            "401": "authentication_error",
            "403": "permission_error",
            "404": "not_found_error",
        }
        if fault.kind in kinds:
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            message = fault.message or f"fakellm: injected {fault.kind}"
            self._error(api, int(fault.kind), kinds[fault.kind], message, headers)
        elif fault.kind == "hang":
            self.server_fake._release.wait(fault.hang_s)
            self.close_connection = True
        elif fault.kind == "malformed":
            self._send_bytes(200, b'{"id": "broken", "choices": [ {"message": ')
        elif fault.kind == "truncated":
            data = json.dumps({"id": "cut", "padding": "x" * 400}).encode("utf-8")
            self._send_bytes(200, data, cut=len(data) // 2)
            self.close_connection = True
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")

    @staticmethod
    def _positions(reply: Reply, n_top: int) -> list[dict[str, Any]]:
        if reply.top_logprobs is not None:
            tables = [reply.top_logprobs] if isinstance(reply.top_logprobs, dict) else reply.top_logprobs
        else:
            tables = [{piece: 0.0} for piece in (reply.content.split(" ") if reply.content else [""])]
        out = []
        for table in tables:
            ranked = sorted(table.items(), key=lambda kv: kv[1], reverse=True)
            token, lp = ranked[0]
            out.append(
                {
                    "token": token,
                    "logprob": lp,
                    "bytes": list(token.encode("utf-8")),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                        for t, v in ranked[:n_top]
                    ],
                }
            )
        return out

    def _openai(self, req: RecordedRequest, reply: Reply) -> dict[str, Any]:
        fake = self.server_fake
        n = fake._next_id()
        message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
        if reply.refusal is not None:
            message.update(content=None, refusal=reply.refusal)
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{n}_{i}",
                    "type": "function",
                    "function": {
                        "name": tc["name"],
                        "arguments": tc["arguments"]
                        if isinstance(tc["arguments"], str)
                        else json.dumps(tc["arguments"]),
                    },
                }
                for i, tc in enumerate(reply.tool_calls)
            ]
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop"),
            "logprobs": None,
        }
        if req.body.get("logprobs"):
            choice["logprobs"] = {"content": self._positions(reply, int(req.body.get("top_logprobs") or 0))}
        prompt_tokens = reply.input_tokens if reply.input_tokens is not None else _words(req.prompt)
        completion_tokens = reply.output_tokens if reply.output_tokens is not None else _words(reply.content)
        return {
            "id": f"chatcmpl-fake{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.body.get("model", "fake"),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _anthropic(self, req: RecordedRequest, reply: Reply) -> dict[str, Any]:
        fake = self.server_fake
        n = fake._next_id()
        content: list[dict[str, Any]] = []
        choice = req.body.get("tool_choice") or {}
        if choice.get("type") == "tool":
            value = reply.json
            if value is None:
                try:
                    value = json.loads(reply.text)
                except json.JSONDecodeError:
                    value = {"text": reply.text}
            content.append({"type": "tool_use", "id": f"toolu_{n}_f", "name": choice["name"], "input": value})
        else:
            if reply.content:
                content.append({"type": "text", "text": reply.content})
            for i, tc in enumerate(reply.tool_calls):
                args = tc["arguments"]
                content.append(
                    {
                        "type": "tool_use",
                        "id": f"toolu_{n}_{i}",
                        "name": tc["name"],
                        "input": json.loads(args) if isinstance(args, str) else args,
                    }
                )
        uses_tool = any(b["type"] == "tool_use" for b in content)
        return {
            "id": f"msg_fake{n}",
            "type": "message",
            "role": "assistant",
            "model": req.body.get("model", "fake"),
            "content": content,
            "stop_reason": reply.finish_reason or ("tool_use" if uses_tool else "end_turn"),
            "stop_sequence": None,
            "usage": {
                "input_tokens": reply.input_tokens if reply.input_tokens is not None else _words(req.prompt),
                "output_tokens": reply.output_tokens
                if reply.output_tokens is not None
                else _words(reply.content),
            },
        }


def main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Serve a FakeLLM answering every request with one reply.")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--text", default="ok", help="the reply text")
    parser.add_argument(
        "--top-logprobs", type=int, default=0, help="script a one-position logprob table of this many tokens"
    )
    args = parser.parse_args()
    table = None
    if args.top_logprobs:
        table = {args.text: -0.05, **{f"alt{k}": -1.0 - k for k in range(args.top_logprobs - 1)}}
    fake = FakeLLM(latency_s=args.latency, default=Reply(text=args.text, top_logprobs=table))
    with fake:
        sys.stdout.write(f"READY {fake.url}\n")
        sys.stdout.flush()
        sys.stdin.read()  # serve until the parent closes our stdin (or kills us)


if __name__ == "__main__":
    main()
