"""The on-disk response cache: one sqlite file, safe with several writers (processes or threads).

Key: a SHA-256 over the provider, the model, the base URL (for servers that share model names), the
messages and every request parameter that changes the reply, including the response schema. The API key
never enters it. Value: the `GenerateResult` as JSON (its raw request and response already scrubbed).

sqlite runs in WAL mode with a busy timeout, so readers never block writers and concurrent writers wait
for each other instead of failing; `INSERT OR REPLACE` makes a repeated write of the same key harmless.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

from caft.env import scrub
from caft.errors import RunDirError
from caft.llm.redact import redact_json
from caft.llm.structured import json_schema, schema_name
from caft.llm.types import GenerateConfig, GenerateResult, Message

CachePolicy = Literal["deterministic", "all", "off", "refresh"]
"""`deterministic`: read and write temperature-0 requests only; `all`: also sampled ones; `off`: no cache;
`refresh`: never read, overwrite deterministic entries with fresh replies."""

CACHE_KEY_VERSION = 1


def cache_key(
    provider: str, model: str, base_url: str | None, messages: list[Message], config: GenerateConfig
) -> str:
    """Hex digest identifying a request. Everything that can change the reply is in it; no credential is
    (keys travel in the SDK client's headers, never in `GenerateConfig`)."""
    cfg = config.model_dump(mode="json")
    if config.response_model is not None:
        cfg["response_model"] = {
            "name": schema_name(config.response_model),
            "schema": json_schema(config.response_model),
        }
    payload = {
        "v": CACHE_KEY_VERSION,
        "provider": provider,
        "model": model,
        "base_url": base_url,
        "messages": [m.model_dump(mode="json") for m in messages],
        "config": cfg,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def is_deterministic(config: GenerateConfig) -> bool:
    return config.temperature == 0.0


def should_read(policy: CachePolicy, config: GenerateConfig) -> bool:
    if policy in ("off", "refresh"):
        return False
    return policy == "all" or is_deterministic(config)


def should_write(policy: CachePolicy, config: GenerateConfig) -> bool:
    if policy == "off":
        return False
    return policy == "all" or is_deterministic(config)


class ResponseCache:
    """A sqlite-backed map from `cache_key` to a stored `GenerateResult`. One connection per instance,
    guarded by a lock, so one instance may be shared by the threads and tasks of a process."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
            )
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " key TEXT PRIMARY KEY, provider TEXT NOT NULL, model TEXT NOT NULL,"
                " created REAL NOT NULL, result TEXT NOT NULL)"
            )
        except sqlite3.DatabaseError as e:
            raise RunDirError(
                f"the LLM cache {self.path} cannot be opened ({e}); delete it to start a fresh cache "
                "or run with the cache off"
            ) from e

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RunDirError(f"the LLM cache {self.path} is closed")
        return self._conn

    def get(self, key: str) -> GenerateResult | None:
        with self._lock:
            row = self._db().execute("SELECT result FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return GenerateResult.model_validate_json(row[0])

    def put(
        self, key: str, provider: str, model: str, result: GenerateResult, *, raw_redacted: bool = False
    ) -> None:
        """Store `result` with its secrets removed. `raw_redacted=True` says its raw request and response
        have been through `redact` already (as `LLMClient` does), so only the text is scrubbed here."""
        stored = result.model_dump(mode="json", exclude={"parsed", "cached"})
        if raw_redacted:
            stored["text"] = scrub(stored["text"])
            blob = json.dumps(stored, ensure_ascii=False)
        else:
            blob = redact_json(stored)
        with self._lock:
            self._db().execute(
                "INSERT OR REPLACE INTO responses (key, provider, model, created, result) VALUES (?, ?, ?, ?, ?)",
                (key, provider, model, time.time(), blob),
            )

    def __len__(self) -> int:
        with self._lock:
            row = self._db().execute("SELECT COUNT(*) FROM responses").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
