"""The demo's replay provider (the triage section of an LLM judge: tests/test_demo.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from caft.app.demo_judge import demo_judge_provider
from caft.errors import DataError
from caft.llm import FatalError, LLMClient, Message


def test_demo_replay_provider_answers_recorded_prompts_only(tmp_path: Path) -> None:
    assert demo_judge_provider(None) is None
    with pytest.raises(DataError, match="not found"):
        demo_judge_provider(str(tmp_path / "missing.jsonl"))
    ex = tmp_path / "exchanges.jsonl"
    rec = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "judge d01"}]}
    ex.write_text(json.dumps({**rec, "replies": ["bad", '{"relation": "undesired"}']}) + "\n")
    provider = demo_judge_provider(str(ex))
    assert provider is not None
    client = LLMClient(provider, max_concurrency=1, max_retries=0)
    got = asyncio.run(client.generate([Message(role="user", content="judge d01")]))
    assert got.text == '{"relation": "undesired"}'  # the last reply (after the repair round)
    with pytest.raises(FatalError, match="no recorded reply"):
        asyncio.run(client.generate([Message(role="user", content="judge d02")]))
