"""Agent mode: native and plain-text tool protocols, budgets, tool errors, transcript, and tool-call round
trips through the fake server in both wire formats (OpenAI and Anthropic)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from caft.agent.config import AgentBudget, TriageConfig
from caft.agent.fixtures import concept_set, injected_set, verdict_for
from caft.agent.loop import AGENT_RESULT_FILE, TRANSCRIPT_FILE, AgentSession, parse_text_tool_calls
from caft.agent.selection import load_verdicts
from caft.agent.task import load_task
from caft.llm import GenerateConfig, LLMClient, Message, MockProvider, get_provider
from caft.testing.fakellm import FakeLLM, Reply

TASK = load_task("emergent-misalignment")
PAIRS = concept_set(1)  # evil pc:L1:0, code pc:L2:0, weather pc:L1:1, gender pc:L2:1
EVIL, CODE = PAIRS[0][0].candidate.id, PAIRS[1][0].candidate.id


def _call(name: str, i: int = 0, **arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{name}_{i}", "name": name, "arguments": arguments}


def _verdict_args(cid: str, concept: str, **over: Any) -> dict[str, Any]:
    return {"candidate": cid, **verdict_for(concept).model_dump(), **over}


def _session(tmp_path: Path, provider: Any, budget: AgentBudget | None = None, **kw: Any) -> AgentSession:
    client = LLMClient(provider, max_concurrency=2, max_retries=0)
    cfg = TriageConfig(kind="agent", budget=budget or AgentBudget(), blind=False)
    return AgentSession(client, TASK, [d for d, _ in PAIRS], cfg, tmp_path, **kw)


def test_native_tools_full_session(tmp_path: Path) -> None:
    script = [
        {
            "text": "Looking closer.",
            "tool_calls": [
                _call("get_examples", candidate=EVIL, sign="max", start=2, count=3),
                _call("board", action="add", text="pc:L1:0 is a villain persona", candidates=[EVIL]),
            ],
        },
        {"tool_calls": [_call("get_logit_lens", candidate=EVIL), _call("compare", a=EVIL, b=CODE)]},
        {"tool_calls": [_call("record_verdict", **_verdict_args(EVIL, "evil"))]},
        {"tool_calls": [_call("record_verdict", 1, **_verdict_args(CODE, "code"))]},
        {"tool_calls": [_call("finish", selected=[CODE])]},  # refused: CODE is intended
        {"tool_calls": [_call("finish", 1, selected=[EVIL], notes="one villain direction")]},
    ]
    provider = MockProvider("agent", script)
    out = asyncio.run(_session(tmp_path, provider).run())
    assert out.finished and out.stopped is None and out.chosen == [EVIL]
    assert set(out.verdicts) == {EVIL, CODE} and out.usage["calls"] == 6
    # tool results went back as tool messages tied to their calls
    last_msgs, cfg = provider.calls[-1]
    assert [t.name for t in cfg.tools][:2] == ["get_examples", "get_diff"]
    tool_msgs = [m for m in last_msgs if m.role == "tool"]
    assert [m.tool_call_id for m in tool_msgs[:2]] == ["call_get_examples_0", "call_board_0"]
    assert (
        "ex:max:2" in tool_msgs[0].content
        and "ex:max:4" in tool_msgs[0].content
        and "ex:max:5" not in tool_msgs[0].content
    )
    assert "#1 [open] pc:L1:0 is a villain persona" in tool_msgs[1].content
    assert "cosine similarity: directions not available" in tool_msgs[3].content
    assert "record an undesired verdict first" in tool_msgs[-1].content
    # verdicts are on disk as agent records; transcript and result written
    recs = {r.candidate: r for r in load_verdicts(tmp_path / "verdicts.jsonl")}
    assert recs[EVIL].method == "agent" and recs[EVIL].exchange == f"{TRANSCRIPT_FILE}#turn=3"
    lines = [json.loads(x) for x in (tmp_path / TRANSCRIPT_FILE).read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "end"
    assert sum(1 for x in lines if "tool" in x) == 8
    result = json.loads((tmp_path / AGENT_RESULT_FILE).read_text())
    assert result["finished"] and result["chosen"] == [EVIL] and result["board"][0]["candidates"] == [EVIL]


def test_overview_is_compact_and_delimited(tmp_path: Path) -> None:
    provider = MockProvider("agent", [{"tool_calls": [_call("finish", selected=[])]}])
    client = LLMClient(provider, max_retries=0)
    session = AgentSession(client, TASK, injected_set(), TriageConfig(kind="agent", blind=False), tmp_path)
    asyncio.run(session.run())
    overview = provider.calls[0][0][1].content
    assert "There are 4 candidate directions" in overview
    assert overview.count("<<<DATA ") == overview.count("<<<END DATA>>>") == 4
    assert "< < <END DATA> > >" in overview  # the injected delimiter look-alike is broken up
    assert len(overview) / 4 < 3000


def test_tool_errors_go_back_to_the_agent(tmp_path: Path) -> None:
    script = [
        {
            "tool_calls": [
                _call("get_diff", candidate="pc:L9:9"),
                _call("record_verdict", **_verdict_args(EVIL, "evil", evidence=["ex:max:77"])),
                _call("steer_live", candidate=EVIL, alpha=4, prompt="hi"),
                _call("no_such_tool"),
                {"id": "bad", "name": "get_diff", "arguments": {}, "parse_error": "not JSON"},
            ]
        },
        {"tool_calls": [_call("finish", selected=[])]},
    ]
    provider = MockProvider("agent", script)
    out = asyncio.run(_session(tmp_path, provider).run())
    results = [m.content for m in provider.calls[-1][0] if m.role == "tool"]
    assert "unknown candidate 'pc:L9:9'" in results[0]
    assert "['ex:max:77'] are not in" in results[1] and "ex:min:0" in results[1]
    assert "live steering is not available" in results[2]
    assert "unknown tool 'no_such_tool'" in results[3]
    assert "were not a JSON object" in results[4]
    assert out.finished and out.verdicts == {}


def test_budget_stops_the_agent_and_keeps_partial_results(tmp_path: Path) -> None:
    def busy(messages: list[Message], config: GenerateConfig) -> Any:
        turn = sum(1 for m in messages if m.role == "assistant")
        if turn == 0:
            return {"tool_calls": [_call("record_verdict", **_verdict_args(EVIL, "evil"))]}
        return {"tool_calls": [_call("get_diff", turn, candidate=CODE)]}

    provider = MockProvider("agent", busy)
    out = asyncio.run(_session(tmp_path, provider, AgentBudget(max_calls=4)).run())
    assert not out.finished and out.stopped == "budget:calls"
    assert len(provider.calls) == 4 and list(out.verdicts) == [EVIL]
    assert [r.candidate for r in load_verdicts(tmp_path / "verdicts.jsonl")] == [EVIL]
    # the agent was warned before the end
    assert any("Budget notice" in m.content for m in provider.calls[-1][0])
    result = json.loads((tmp_path / AGENT_RESULT_FILE).read_text())
    assert result["stopped"] == "budget:calls" and result["verdicts"] == 1

    # dollar budget: a priced model whose first reply already costs more than the limit
    from caft.llm import Price

    p3 = MockProvider("agent", busy)
    client = LLMClient(
        p3, max_retries=0, prices={"mock/agent": Price(input_per_mtok=1e6, output_per_mtok=0.0)}
    )
    cfg = TriageConfig(kind="agent", budget=AgentBudget(max_usd=5.0), blind=False)
    out3 = asyncio.run(AgentSession(client, TASK, [d for d, _ in PAIRS], cfg, tmp_path / "usd").run())
    assert out3.stopped == "budget:usd" and len(p3.calls) == 1 and out3.usage["cost_usd"] > 5.0

    # token budget: one reply is enough to exceed a tiny limit
    p2 = MockProvider("agent", busy)
    out2 = asyncio.run(_session(tmp_path / "t", p2, AgentBudget(max_tokens=50)).run())
    assert out2.stopped == "budget:tokens" and len(p2.calls) == 1 and list(out2.verdicts) == [EVIL]


def test_plain_text_tool_protocol(tmp_path: Path) -> None:
    v = _verdict_args(EVIL, "evil")
    script = [
        "Let me look.\n<tool_call>\n"
        + json.dumps({"name": "get_logit_lens", "arguments": {"candidate": EVIL}})
        + "\n</tool_call>\n<tool_call>{not json}</tool_call>",
        "<tool_call>```json\n" + json.dumps({"name": "record_verdict", "arguments": v}) + "\n```</tool_call>",
        "I am done thinking.",
        '<tool_call>{"name": "finish", "arguments": {"selected": ["' + EVIL + '"]}}</tool_call>',
    ]
    provider = MockProvider("agent", script, tools=False)
    out = asyncio.run(_session(tmp_path, provider).run())
    assert out.finished and out.chosen == [EVIL]
    first_cfg = provider.calls[0][1]
    assert first_cfg.tools == [] and "<tool_call>" in provider.calls[0][0][0].content
    second = provider.calls[1][0][-1].content
    assert (
        second.startswith('<tool_result name="get_logit_lens">') and "tool call 2: not valid JSON" in second
    )
    assert "Continue:" in provider.calls[3][0][-1].content


def test_parse_text_tool_calls() -> None:
    calls, errors = parse_text_tool_calls(
        '<tool_call>{"name": "board", "arguments": {"action": "list"}}</tool_call>'
        '<TOOL_CALL>{"arguments": {}}</TOOL_CALL><tool_call>{"name": "x", "arguments": []}</tool_call>',
        7,
    )
    assert [(c.id, c.name, c.arguments) for c in calls] == [("t7-0", "board", {"action": "list"})]
    assert len(errors) == 2 and "expected" in errors[0] and "`arguments` must be an object" in errors[1]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_tool_call_round_trip_through_fake_server(
    tmp_path: Path, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-real")
    with FakeLLM() as fake:
        fake.reply_in_order(
            Reply(text="checking", tool_calls=[{"name": "get_diff", "arguments": {"candidate": EVIL}}]),
            Reply(tool_calls=[{"name": "record_verdict", "arguments": _verdict_args(EVIL, "evil")}]),
            Reply(tool_calls=[{"name": "finish", "arguments": {"selected": [EVIL]}}]),
        )
        if api == "openai":
            provider = get_provider("openai/gpt-4.1", base_url=fake.openai_base_url)
        else:
            provider = get_provider("anthropic/claude-test-model", base_url=fake.anthropic_base_url)
        out = asyncio.run(_session(tmp_path, provider).run())
        assert out.finished and out.chosen == [EVIL] and EVIL in out.verdicts
        assert len(fake.requests) == 3
        body = fake.requests[1].body
        names = [t.get("name") or t.get("function", {}).get("name") for t in body["tools"]]
        assert "record_verdict" in names and "finish" in names
        if api == "openai":
            tool_msg = next(m for m in body["messages"] if m["role"] == "tool")
            assert tool_msg["tool_call_id"] and "mean (ft - base) projection" in tool_msg["content"]
            asst = next(m for m in body["messages"] if m["role"] == "assistant")
            assert asst["tool_calls"][0]["function"]["name"] == "get_diff"
        else:
            blocks = [
                b for m in body["messages"] for b in (m["content"] if isinstance(m["content"], list) else [])
            ]
            result = next(b for b in blocks if b["type"] == "tool_result")
            use = next(b for b in blocks if b["type"] == "tool_use")
            assert result["tool_use_id"] == use["id"] and use["name"] == "get_diff"
            assert "mean (ft - base) projection" in json.dumps(result["content"])
        recs = load_verdicts(tmp_path / "verdicts.jsonl")
        assert [r.judge for r in recs] == [provider.model_id]


def test_live_steering_tool_with_a_tiny_model(tmp_path: Path) -> None:
    import torch

    from caft.agent.steer import HookSteerer
    from caft.config import ModelConfig
    from caft.models import LoadedModel
    from caft.sites import Sites
    from caft.testing import tiny_model, tiny_tokenizer

    model = tiny_model("llama", hidden=32, layers=2)
    tok = tiny_tokenizer("chatml")
    tok.pad_token = tok.pad_token or tok.eos_token
    loaded = LoadedModel(
        model, tok, Sites.of(model), torch.device("cpu"), torch.float32, ModelConfig(name_or_path="tiny")
    )
    direction = torch.zeros(32)
    direction[3] = 1.0
    steerer = HookSteerer(loaded, {EVIL: direction}, {EVIL: 1}, {EVIL: 50.0}, max_new_tokens=6)
    plain = steerer(EVIL, 0.0, "hello there")
    steered = steerer(EVIL, 4.0, "hello there")
    assert plain != steered
    assert steerer(EVIL, 0.0, "hello there") == plain  # the hook was removed
    assert not Sites.of(model).layer_module(model, 1)._forward_hooks

    script = [
        {
            "tool_calls": [
                _call("steer_live", i, candidate=EVIL, alpha=4, prompt="hello there") for i in range(3)
            ]
        },
        {"tool_calls": [_call("finish", selected=[])]},
    ]
    provider = MockProvider("agent", script)
    out = asyncio.run(_session(tmp_path, provider, AgentBudget(max_live=2), steerer=steerer).run())
    results = [m.content for m in provider.calls[-1][0] if m.role == "tool"]
    assert "live generation (1 left)" in results[0] and "(0 left)" in results[1]
    assert "budget (2) is used up" in results[2]
    assert out.live_used == 2 and steerer.calls == 5
