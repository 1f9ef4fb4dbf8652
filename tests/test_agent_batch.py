"""Single-shot triage with `batch: true` through the real SDKs against the fake server's batch endpoints: the
same records as one by one, repair rounds one by one, cost at batch prices, and a crash mid-poll resumed
without resubmitting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
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


def run_judge_signalled(fake: FakeLLM, out: Path, *, batch: bool, after_s: float | None) -> JudgeOutcome:
    """`run_judge` with one request at a time, and a SIGTERM to this process `after_s` seconds into the run
    (None: none from here)."""
    dossiers = [d for d, _ in concept_set(2)]
    cfg = TriageConfig(batch=batch, batch_poll_s=0.05)

    async def go() -> JudgeOutcome:
        async with make_client(
            fake, "openai/gpt-4.1", prices={"openai/gpt-4.1": PRICE}, max_concurrency=1
        ) as c:
            if after_s is not None:
                asyncio.get_running_loop().call_later(after_s, os.kill, os.getpid(), signal.SIGTERM)
            return await asyncio.wait_for(SingleJudge(c, TASK, cfg, out).run(dossiers), 60)

    return asyncio.run(go())


def test_sigterm_mid_poll_stops_the_batch_and_a_rerun_polls_it(fake: FakeLLM, tmp_path: Path) -> None:
    out = tmp_path / "triage"
    fake.batch.delay_s = 3600.0
    outcome = run_judge_signalled(fake, out, batch=True, after_s=0.8)
    assert outcome.stopped == f"interrupted by signal {int(signal.SIGTERM)}" and outcome.judged == 0
    assert fake.batches_created == 1 and not fake.requests
    fake.end_batches()
    again = run_judge_signalled(fake, out, batch=True, after_s=None)
    assert again.stopped is None and again.judged == 8 and len(records(out)) == 8
    assert fake.batches_created == 1 and len(fake.batch_requests) == 8  # the same batch, polled


def test_sigterm_one_by_one_keeps_the_verdicts_in_flight_and_stops_new_ones(
    fake: FakeLLM, tmp_path: Path
) -> None:
    out = tmp_path / "triage"
    seen: list[int] = []

    def reply(req: RecordedRequest) -> Reply:
        seen.append(1)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the judge's event loop in the main thread
        return judge_reply(req)

    fake.on_request(reply)
    outcome = run_judge_signalled(fake, out, batch=False, after_s=None)
    assert outcome.stopped is not None and "signal" in outcome.stopped
    kept = records(out)
    assert 0 < len(kept) < 8 and all(r["verdict"] is not None or r["unscored"] for r in kept.values())
    first = len(fake.requests)
    again = run_judge_signalled(fake, out, batch=False, after_s=None)
    assert again.stopped is None and len(records(out)) == 8
    assert again.resumed >= 1 and len(fake.requests) - first < 10  # what was kept is not asked again
