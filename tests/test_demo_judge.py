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


def test_replay_warns_once_when_the_recorded_system_prompt_differs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ex = tmp_path / "exchanges.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "prompt v1"},
                {"role": "user", "content": f"judge d0{i}"},
            ],
            "replies": [f'{{"n": {i}}}'],
        }
        for i in (1, 2)
    ]
    ex.write_text("".join(json.dumps(r) + "\n" for r in rows))
    provider = demo_judge_provider(str(ex))
    assert provider is not None
    client = LLMClient(provider, max_concurrency=1, max_retries=0)

    def ask(system: str, user: str) -> str:
        msgs = [Message(role="system", content=system), Message(role="user", content=user)]
        return asyncio.run(client.generate(msgs)).text

    with caplog.at_level("WARNING", logger="caft.agent.bench"):
        assert ask("prompt v1", "judge d01") == '{"n": 1}'
        assert not [r for r in caplog.records if "different system prompt" in r.message]
        # the prompts changed since the recording: the reply is still the recorded one, and it is said once
        assert ask("prompt v2", "judge d02") == '{"n": 2}'
        assert ask("prompt v2", "judge d01") == '{"n": 1}'
    warned = [r for r in caplog.records if "different system prompt" in r.message]
    assert len(warned) == 1 and str(ex) in warned[0].message
