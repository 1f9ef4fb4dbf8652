"""The demo with an LLM judge or replayed replies: the triage section and the replay provider."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from caft.app.demo import DemoConfig, demo_run_config
from caft.app.demo_judge import REPLAY_MODEL, demo_judge_provider
from caft.errors import DataError
from caft.llm import FatalError, LLMClient, Message


def _encoder(tmp_path: Path) -> Path:
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    return enc


def test_llm_judge_gets_the_same_controls_and_policy_as_the_offline_one(tmp_path: Path) -> None:
    enc = str(_encoder(tmp_path))
    offline = demo_run_config(DemoConfig(model_path=enc, max_per_layer=3), tmp_path / "s0", 0).triage
    llm = demo_run_config(
        DemoConfig(model_path=enc, max_per_layer=3, triage_judge="openai/gpt-4.1"), tmp_path / "s0", 0
    ).triage
    assert offline.kind == "offline-embedding" and llm.kind == "single"
    assert llm.judge.model == "openai/gpt-4.1" and llm.blind
    assert llm.controls_per_layer == offline.controls_per_layer == 20
    assert llm.selection == offline.selection
    replayed = demo_run_config(
        DemoConfig(model_path=enc, triage_replay=str(tmp_path / "x.jsonl")), tmp_path / "s0", 0
    ).triage
    assert replayed.kind == "single" and replayed.judge.model == REPLAY_MODEL


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
