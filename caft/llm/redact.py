"""Secrets out of request/response records, cheaply enough to run on every call.

`caft.env.scrub_obj` looks the secret values up again for every string it visits, which costs about a
millisecond on a top-20-logprobs response and would make the client CPU-bound at a few hundred calls per
second. `redact` gives the same result in one pass: serialize, `caft.env.scrub` the text once, and only when
that changed something (or a credential-named key appears) rebuild the object. A secret that JSON would
escape (quotes, backslashes, control characters) cannot be matched in serialized text, so then it falls back
to `scrub_obj`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from caft.env import CREDENTIAL_KEYS, scrub, scrub_obj, secret_values

# a credential-named key in serialized JSON (the key set is caft.env's, the one list)
_CREDENTIAL_KEY_TEXT = re.compile(
    '"(?:' + "|".join(re.escape(k) for k in sorted(CREDENTIAL_KEYS)) + ')"\\s*:', re.IGNORECASE
)


def _drop_credential_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: _drop_credential_keys(v)
            for k, v in obj.items()
            if not (isinstance(k, str) and k.lower() in CREDENTIAL_KEYS)
        }
    if isinstance(obj, list):
        return [_drop_credential_keys(v) for v in obj]
    return obj


def redact_json(obj: Any) -> str:
    """`obj` serialized as JSON, with secrets and credential-named keys removed (see `redact`)."""
    if any(json.dumps(v, ensure_ascii=False)[1:-1] != v for v in secret_values()):
        return json.dumps(scrub_obj(obj), ensure_ascii=False)
    clean = scrub(json.dumps(obj, ensure_ascii=False))
    if _CREDENTIAL_KEY_TEXT.search(clean) is not None:
        return json.dumps(_drop_credential_keys(json.loads(clean)), ensure_ascii=False)
    return clean


def redact(obj: Any) -> Any:
    """`obj` (JSON-like) with every secret value and key-shaped string replaced by `***` and credential-named
    keys removed; equal to `caft.env.scrub_obj(obj)` for JSON data. Returns `obj` itself when it holds no
    secret."""
    if any(json.dumps(v, ensure_ascii=False)[1:-1] != v for v in secret_values()):
        return scrub_obj(obj)
    text = json.dumps(obj, ensure_ascii=False)
    clean = scrub(text)
    has_key_names = _CREDENTIAL_KEY_TEXT.search(clean) is not None
    if clean == text and not has_key_names:
        return obj
    value = json.loads(clean)
    return _drop_credential_keys(value) if has_key_names else value
