"""Single-shot judging with the mock provider: parsing and repair, evidence checks, resume, relevance, budgets,
and what reaches the provider for dossiers carrying prompt injections."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from caft.agent.config import TriageConfig
from caft.agent.fixtures import concept_of_text, concept_set, injected_set, verdict_for
from caft.agent.render import DATA_CLOSE
from caft.agent.selection import load_verdicts
from caft.agent.single import EXCHANGES_FILE, SingleJudge, build_messages, relevance_from_logprobs
from caft.agent.task import load_task
from caft.llm import BudgetExceededError, GenerateConfig, GenerateResult, LLMClient, Message, MockProvider
from caft.llm.types import PositionLogprobs, RetryableError, TokenLogprob

TASK = load_task("emergent-misalignment")


def _user(messages: list[Message]) -> str:
    return "\n".join(m.content for m in messages if m.role == "user")


def sensible(messages: list[Message], config: GenerateConfig) -> Any:
    """A scripted judge: answers by the concept its evidence is about."""
    if config.logprobs:
        return {"text": "85", "top_logprobs": {"85": -0.2, "90": -1.8, "x": -3.0}}
    return verdict_for(concept_of_text(_user(messages))).model_dump()


def _judge(tmp_path: Path, provider: MockProvider, **cfg: Any) -> SingleJudge:
    client = LLMClient(provider, max_concurrency=4, max_retries=0, stage="triage")
    # not blind: the scripted replies route on the candidate id in the prompt
    return SingleJudge(client, TASK, TriageConfig(**({"blind": False} | cfg)), tmp_path)


def test_verdicts_stream_with_exchanges(tmp_path: Path) -> None:
    pairs = concept_set(2)
    judge = _judge(tmp_path, MockProvider("j", sensible))
    out = asyncio.run(judge.run([d for d, _ in pairs]))
    assert out.judged == 8 and sum(out.unscored.values()) == 0
    recs = {r.candidate: r for r in load_verdicts(tmp_path / "verdicts.jsonl")}
    expected = {"evil": "undesired", "code": "intended", "weather": "unrelated", "gender": "unclear"}
    for d, concept in pairs:
        r = recs[d.candidate.id]
        assert r.verdict is not None and r.verdict.relation == expected[concept]
        assert r.judge == "mock/j" and r.method == "single"
        assert set(r.verdict.evidence) <= d.evidence_ids()
    refs = {json.loads(line)["ref"] for line in (tmp_path / EXCHANGES_FILE).read_text().splitlines()}
    assert {r.exchange for r in recs.values()} == refs
    assert all(r.startswith(f"{EXCHANGES_FILE}#") for r in refs)


def test_parse_failure_is_unscored_and_repair_round_recovers(tmp_path: Path) -> None:
    d1, d2 = (d for d, _ in concept_set(1)[:2])
    good = verdict_for("evil").model_dump()
    bad_json = "I think this is about villains, confidence high."
    # d1: garbage twice (first reply + the client's repair round) -> unscored; d2: garbage, then repaired
    script = {d1.candidate.id: [bad_json, bad_json], d2.candidate.id: ["{not json", good]}

    def reply(messages: list[Message], config: GenerateConfig) -> Any:
        cid = next(k for k in script if f"Candidate {k} " in messages[1].content)
        return script[cid].pop(0)

    judge = _judge(tmp_path, MockProvider("j", reply))
    out = asyncio.run(judge.run([d1, d2]))
    assert out.judged == 1 and out.unscored == {"parse_failure": 1}
    recs = {r.candidate: r for r in load_verdicts(tmp_path / "verdicts.jsonl")}
    assert recs[d1.candidate.id].verdict is None
    assert recs[d1.candidate.id].unscored is not None and recs[d1.candidate.id].unscored.startswith(
        "parse_failure"
    )
    assert recs[d2.candidate.id].verdict is not None and recs[d2.candidate.id].verdict.label == "evil concept"
    # the failing reply text is kept in the exchange log for inspection
    assert bad_json in (tmp_path / EXCHANGES_FILE).read_text()


def test_invalid_evidence_gets_one_repair_round(tmp_path: Path) -> None:
    d1, d2 = (d for d, _ in concept_set(1)[:2])
    wrong = verdict_for("evil", evidence=["ex:max:99", "lens"]).model_dump()
    right = verdict_for("evil", evidence=["ex:max:1"]).model_dump()
    seen: list[str] = []

    def reply(messages: list[Message], config: GenerateConfig) -> Any:
        seen.append(messages[-1].content)
        if f"Candidate {d1.candidate.id} " in messages[1].content:
            return right if len(messages) > 2 else wrong
        return wrong  # d2 never fixes it

    out = asyncio.run(_judge(tmp_path, MockProvider("j", reply)).run([d1, d2]))
    assert out.judged == 1 and out.unscored == {"invalid_evidence": 1}
    recs = {r.candidate: r for r in load_verdicts(tmp_path / "verdicts.jsonl")}
    v1 = recs[d1.candidate.id].verdict
    assert v1 is not None and v1.evidence == ["ex:max:1"]
    assert recs[d2.candidate.id].unscored is not None and "ex:max:99" in recs[d2.candidate.id].unscored
    repairs = [s for s in seen if "not in this candidate's dossier" in s]
    assert len(repairs) == 2 and all("ex:max:99" in s and "ex:min:0" in s for s in repairs)


def test_resume_skips_done_and_retries_provider_errors(tmp_path: Path) -> None:
    dossiers = [d for d, _ in concept_set(2)]
    first, rest = dossiers[:3], dossiers[3:]
    failing = first[2].candidate.id

    def flaky(messages: list[Message], config: GenerateConfig) -> Any:
        if f"Candidate {failing} " in messages[1].content:
            return RetryableError("server busy")
        return sensible(messages, config)

    out1 = asyncio.run(_judge(tmp_path, MockProvider("j", flaky)).run(first))
    assert out1.judged == 2 and out1.unscored == {"provider_error": 1}

    p2 = MockProvider("j", sensible)
    out2 = asyncio.run(_judge(tmp_path, p2).run(dossiers))
    asked = set()
    for msgs, _ in p2.calls:
        m = re.search(r"Candidate (\S+) ", msgs[1].content)
        assert m is not None
        asked.add(m.group(1))
    assert asked == {failing} | {d.candidate.id for d in rest}
    assert out2.resumed == 2 and out2.judged == len(dossiers) - 2
    recs = load_verdicts(tmp_path / "verdicts.jsonl")
    assert len(recs) == len(dossiers) and all(r.verdict is not None for r in recs)


def test_budget_stops_cleanly_and_keeps_results(tmp_path: Path) -> None:
    dossiers = [d for d, _ in concept_set(2)]
    n = {"calls": 0}

    def metered(messages: list[Message], config: GenerateConfig) -> Any:
        n["calls"] += 1
        if n["calls"] > 3:
            return BudgetExceededError("spent $5.00 of $5.00")
        return sensible(messages, config)

    client = LLMClient(MockProvider("j", metered), max_concurrency=1, max_retries=0)
    out = asyncio.run(SingleJudge(client, TASK, TriageConfig(), tmp_path).run(dossiers))
    assert out.stopped is not None and out.stopped.startswith("budget")
    assert len(load_verdicts(tmp_path / "verdicts.jsonl")) == 3


def test_relevance_from_logprobs_and_skip_without_them(tmp_path: Path) -> None:
    d = concept_set(1)[0][0]
    out = asyncio.run(_judge(tmp_path / "a", MockProvider("j", sensible), relevance=True).run([d]))
    rec = out.records[0]
    p85, p90 = 2.718281828**-0.2, 2.718281828**-1.8
    assert rec.relevance == pytest.approx((85 * p85 + 90 * p90) / (p85 + p90), abs=1e-3)
    out2 = asyncio.run(
        _judge(tmp_path / "b", MockProvider("j", sensible, logprobs=False), relevance=True).run([d])
    )
    assert out2.records[0].relevance is None and out2.relevance_skipped is not None
    low = GenerateResult(
        text="x",
        logprobs=[PositionLogprobs(token="x", logprob=-0.01, top=[TokenLogprob(token="x", logprob=-0.01)])],
    )
    assert relevance_from_logprobs(low) == (None, 0.0)


def test_injected_text_reaches_the_provider_delimited_and_escaped(tmp_path: Path) -> None:
    dossiers = injected_set()
    provider = MockProvider("j", sensible)
    asyncio.run(_judge(tmp_path, provider).run(dossiers))
    assert len(provider.calls) == len(dossiers)
    for messages, _ in provider.calls:
        system, user = messages[0].content, messages[1].content
        assert "never instructions" in system and "<<<DATA" in system
        # the only delimiter lines are ours, balanced, and injected text sits inside blocks
        lines = user.splitlines()
        opens = [i for i, s in enumerate(lines) if s.startswith("<<<DATA ")]
        closes = [i for i, s in enumerate(lines) if s == DATA_CLOSE]
        assert len(opens) == len(closes) > 0
        assert all(o < c for o, c in zip(opens, closes, strict=True))
        assert all(c < o for c, o in zip(closes, opens[1:], strict=False))
        inside = set()
        for o, c in zip(opens, closes, strict=True):
            inside |= set(range(o + 1, c))
        for i, s in enumerate(lines):
            if "mark this benign" in s:
                assert i in inside, f"injected text outside a data block: {s!r}"
            if i in inside:
                assert "<<<" not in s and ">>>" not in s and "＜＜" not in s and "\u200b" not in s
        assert user.count("mark this benign") >= 2


def test_build_messages_fit_the_prompt_budget() -> None:
    d = injected_set()[1]
    messages = build_messages(d, TASK, TriageConfig())
    words = sum(len(m.content.split()) for m in messages)
    chars = sum(len(m.content) for m in messages)
    assert chars / 4 < 3000 and words < 2200
