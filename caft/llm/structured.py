"""Structured output shared by every provider: schemas, the schema-in-prompt fallback, validation, repair.

Providers only decide HOW to ask for JSON (OpenAI: a JSON-schema response format; Anthropic: a forced tool;
compatible servers: JSON mode or instructions in the prompt). Validation and the single repair round live in
the client so that every provider fails the same way: a `StructuredOutputError`, never a made-up value.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from caft.llm.types import Message

_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n\s*```\s*$", re.DOTALL)


def schema_name(model: type[BaseModel]) -> str:
    """A name the APIs accept (letters, digits, `_`, `-`; at most 64 characters)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", model.__name__)
    return name[:64] or "response"


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any] | None:
    """The model's schema in the shape OpenAI's strict mode demands (every object closed with
    `additionalProperties: false`, every property required, no defaults), or None when the model cannot be
    expressed that way (a free-form `dict` field); the caller then sends the plain schema without `strict`.
    Validation happens on our side against the pydantic model either way."""
    schema = copy.deepcopy(model.model_json_schema())
    return schema if _make_strict(schema) else None


def _make_strict(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return True
    ok = True
    schema.pop("default", None)
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties")
        if not isinstance(props, dict) or schema.get("additionalProperties") not in (None, False):
            ok = False  # a free-form mapping
        else:
            schema["additionalProperties"] = False
            schema["required"] = list(props)
            for sub in props.values():
                ok = _make_strict(sub) and ok
    for key in ("anyOf", "allOf", "oneOf", "prefixItems"):
        for sub in schema.get(key, []):
            ok = _make_strict(sub) and ok
    if isinstance(schema.get("items"), dict):
        ok = _make_strict(schema["items"]) and ok
    for sub in schema.get("$defs", {}).values():
        ok = _make_strict(sub) and ok
    return ok


def schema_instructions(model: type[BaseModel]) -> str:
    """Instructions appended to the system prompt for servers without native structured output."""
    schema = json.dumps(json_schema(model), ensure_ascii=False)
    return (
        "Reply with a single JSON object and nothing else (no prose, no code fence). "
        f"It must validate against this JSON schema:\n{schema}"
    )


def with_schema_instructions(messages: list[Message], model: type[BaseModel]) -> list[Message]:
    """The messages with the schema instructions added to the system message (one is created if absent)."""
    text = schema_instructions(model)
    out = [m.model_copy() for m in messages]
    if out and out[0].role == "system":
        out[0] = out[0].model_copy(update={"content": f"{out[0].content}\n\n{text}".strip()})
    else:
        out.insert(0, Message(role="system", content=text))
    return out


def extract_json_text(text: str) -> str:
    """Strip a surrounding markdown code fence, which some models add even when told not to."""
    m = _FENCE.match(text)
    return m.group(1) if m else text.strip()


def validate(model: type[BaseModel], text: str) -> tuple[BaseModel | None, str | None]:
    """(instance, None) when `text` validates, else (None, a short description of what is wrong)."""
    body = extract_json_text(text)
    try:
        return model.model_validate_json(body), None
    except ValidationError as e:
        lines = []
        for err in e.errors(include_url=False)[:10]:
            where = ".".join(str(x) for x in err["loc"]) or "(root)"
            lines.append(f"{where}: {err['msg']}")
        return None, "; ".join(lines)


def repair_messages(messages: list[Message], bad_text: str, error: str) -> list[Message]:
    """The conversation for the single repair round: the invalid reply, then the validation error."""
    return [
        *messages,
        Message(role="assistant", content=bad_text),
        Message(
            role="user",
            content=(
                f"Your reply did not validate: {error}\n"
                "Reply again with only the corrected JSON object that follows the schema."
            ),
        ),
    ]
