"""Single-shot triage with `batch: true` through the real SDKs against the fake server's batch endpoints: the
same records as one by one, repair rounds one by one, cost at batch prices, and a crash mid-poll resumed
without resubmitting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_helpers import make_client, set_keys

from caft.agent.config import TriageConfig
from caft.agent.fixtures import concept_of_text, concept_set, verdict_for
from caft.agent.selection import load_verdicts
from caft.agent.single import BATCH_DIR, JudgeOutcome, SingleJudge
from caft.agent.task import load_task
from caft.llm import Price
from caft.llm.batch import STATE_FILE
from caft.llm.prices import BATCH_DISCOUNT
from caft.testing.fakellm import FakeLLM, RecordedRequest, Reply

TASK = load_task("emergent-misalignment")
MODELS = ["openai/gpt-4.1", "anthropic/claude-sonnet-4-6"]
PRICE = Price(input_per_mtok=2.0, output_per_mtok=8.0)
REPAIR = "not in this candidate's dossier"


def judge_reply(req: RecordedRequest) -> Reply:
    user = req.body["messages"][-1]["content"]
    text = user if isinstance(user, str) else json.dumps(user)
    concept = concept_of_text(req.prompt)
    bad = concept == "weather" and REPAIR not in text
    evidence = ["ex:max:99"] if bad else ["ex:max:0", "lens"]  # weather: one evidence repair round
    verdict = verdict_for(concept, evidence=evidence).model_dump()
    return Reply(json=verdict, input_tokens=500, output_tokens=50)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLLM]:
    set_keys(monkeypatch)
    with FakeLLM() as server:
        server.on_request(judge_reply)
        yield server


def run_judge(
    fake: FakeLLM, model: str, out: Path, *, batch: bool, timeout: float | None = None
) -> tuple[JudgeOutcome, float]:
    dossiers = [d for d, _ in concept_set(2)]
    cfg = TriageConfig(batch=batch, batch_poll_s=0.05)

    async def go() -> tuple[JudgeOutcome, float]:
        async with make_client(fake, model, prices={model: PRICE}, stage="triage") as client:
            judge = SingleJudge(client, TASK, cfg, out)
            outcome = await asyncio.wait_for(judge.run(dossiers), timeout)
            return outcome, client.usage.cost_usd

    return asyncio.run(go())


def records(out: Path) -> dict[str, dict[str, object]]:
    return {r.candidate: r.model_dump(mode="json") for r in load_verdicts(out / "verdicts.jsonl")}


@pytest.mark.parametrize("model", MODELS)
def test_batched_triage_equals_one_by_one(fake: FakeLLM, model: str, tmp_path: Path) -> None:
    _, single_cost = run_judge(fake, model, tmp_path / "single", batch=False)
    assert len(fake.requests) == 10 and fake.batches_created == 0
    fake.reset()
    fake.on_request(judge_reply)
    outcome, cost = run_judge(fake, model, tmp_path / "batched", batch=True)
    assert records(tmp_path / "single") == records(tmp_path / "batched")
    assert outcome.judged == 8 and not outcome.unscored
    # 8 verdict requests in one batch; only the 2 weather candidates' repair rounds went one by one
    assert fake.batches_created == 1 and len(fake.batch_requests) == 8
    assert len(fake.requests) == 2 and all(REPAIR in r.prompt for r in fake.requests)
    # 10 calls of equal size: 8 at the batch price, 2 at the standard one
    assert cost == pytest.approx(single_cost * (8 * BATCH_DISCOUNT + 2) / 10)
    assert (tmp_path / "batched" / BATCH_DIR / STATE_FILE).is_file()


def test_crash_mid_poll_resumes_the_same_batch(fake: FakeLLM, tmp_path: Path) -> None:
    out = tmp_path / "triage"
    fake.batch.delay_s = 3600.0
    with pytest.raises(asyncio.TimeoutError):
        run_judge(fake, "openai/gpt-4.1", out, batch=True, timeout=1.0)
    assert fake.batches_created == 1 and len(fake.batch_requests) == 8 and not fake.requests
    assert not (out / "verdicts.jsonl").exists() or not records(out)
    fake.end_batches()
    outcome, _ = run_judge(fake, "openai/gpt-4.1", out, batch=True)
    assert outcome.judged == 8 and len(records(out)) == 8
    assert fake.batches_created == 1 and len(fake.batch_requests) == 8  # polled again, never resubmitted
    assert len(fake.requests) == 2  # the repair rounds
