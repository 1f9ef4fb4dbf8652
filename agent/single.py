"""Single-shot judging: one validated verdict per candidate (and per sample), streamed to verdicts.jsonl.

For each dossier the judge gets the system prompt (task + rules on untrusted data) and the rendered dossier,
and must return a `JudgeVerdict`. The LLM client validates the reply and runs one repair round for malformed
JSON; a reply that still fails is recorded as `unscored: parse_failure`, never guessed. Cited evidence ids are
checked against the dossier; one more repair round names the unknown ids, then the record is
`unscored: invalid_evidence`. Optionally a second call reads a 0-100 relevance score from logprobs.

Each record is appended (flushed, fsynced) as soon as it is ready, with the raw exchange in exchanges.jsonl,
so a rerun skips what is done. Provider errors are retried on a rerun; parse failures are kept (the same
prompt would fail the same way from the cache).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from caft.agent.config import TriageConfig
from caft.agent.judges import JudgeRun, open_client, refused
from caft.agent.render import render_dossier, render_prompt, render_system_single, safe_id
from caft.agent.schema import VERDICTS_FILE, JudgeVerdict, TaskDescription, VerdictRecord
from caft.env import scrub
from caft.errors import DataError
from caft.interp.schema import Dossier
from caft.llm import (
    BudgetExceededError,
    FatalError,
    GenerateConfig,
    GenerateResult,
    LLMClient,
    LLMError,
    Message,
    StructuredOutputError,
)
from caft.rundir import JsonlWriter, SignalDrain, fsync_file

if TYPE_CHECKING:
    import torch

    from caft.llm import Provider

log = logging.getLogger(__name__)

EXCHANGES_FILE = "exchanges.jsonl"
BATCH_DIR = "judge_batch"
"""Folder of the stage holding the provider batch state in batch mode (`caft.llm.batch`)."""
T = TypeVar("T")


@dataclass
class JudgeOutcome:
    """What a judging pass did (also written to the stage's summary)."""

    candidates: int = 0
    resumed: int = 0
    judged: int = 0
    unscored: Counter[str] = field(default_factory=Counter)
    stopped: str | None = None
    relevance_skipped: str | None = None
    seconds: float = 0.0
    """Wall time of the judging requests (loading and selection excluded)."""
    records: list[VerdictRecord] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "resumed": self.resumed,
            "judged": self.judged,
            "unscored": dict(self.unscored),
            "unscored_total": sum(self.unscored.values()),
            "stopped": self.stopped,
            "relevance_skipped": self.relevance_skipped,
            "judge_seconds": round(self.seconds, 3),
        }


def build_messages(
    dossier: Dossier, task: TaskDescription, cfg: TriageConfig, system: str | None = None
) -> list[Message]:
    """The exact messages a single-shot judge receives for one dossier."""
    sys_text = system if system is not None else render_system_single(task, cfg.prompts_dir)
    body = render_dossier(dossier, cfg.render, blind=cfg.blind)
    user = render_prompt("user_single", cfg.prompts_dir, dossier=body)
    return [Message(role="system", content=sys_text), Message(role="user", content=user)]


def check_evidence(verdict: JudgeVerdict, dossier: Dossier) -> tuple[JudgeVerdict, list[str]]:
    """Map cited ids onto the dossier's ids (the prompt shows sanitized ids); return the unknown ones."""
    valid = dossier.evidence_ids()
    alias = {safe_id(i): i for i in valid} | {i: i for i in valid}
    cited = [alias.get(e.strip(), e) for e in verdict.evidence]
    bad = [e for e in cited if e not in valid]
    if not cited:
        bad = ["(none cited)"]
    return verdict.model_copy(update={"evidence": cited}), bad


def relevance_from_logprobs(result: GenerateResult) -> tuple[float | None, float]:
    """Expected value over the integer tokens 0-100 at the first position; None when they hold < 25% mass."""
    if not result.logprobs:
        return None, 0.0
    first = result.logprobs[0]
    table = first.top or []
    weights: dict[int, float] = {}
    for t in table:
        s = t.token.strip()
        if s.isdigit() and 0 <= int(s) <= 100:
            weights[int(s)] = weights.get(int(s), 0.0) + math.exp(t.logprob)
    mass = sum(weights.values())
    if mass < 0.25:
        return None, mass
    return sum(k * p for k, p in weights.items()) / mass, mass


async def bounded(
    items: Sequence[T],
    fn: Callable[[T], Awaitable[None]],
    workers: int,
    stopping: Callable[[], bool] = lambda: False,
) -> None:
    """Run `fn` over items with a fixed pool of workers; a fatal or budget error stops new work and is raised
    after the items in flight finish. `stopping()` true (a signal) stops new work too, without an error."""
    it = iter(items)
    stop: list[LLMError] = []

    async def worker() -> None:
        for x in it:
            if stop or stopping():
                return
            try:
                await fn(x)
            except (FatalError, BudgetExceededError) as e:
                stop.append(e)
                return

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(items))))))
    if stop:
        raise stop[0]


class SingleJudge:
    """Judges dossiers one request each (plus repair and relevance rounds), appending records as they finish."""

    def __init__(
        self, client: LLMClient, task: TaskDescription, cfg: TriageConfig, out_dir: str | Path
    ) -> None:
        self.client = client
        self.task = task
        self.cfg = cfg
        self.out = Path(out_dir)
        self.system = render_system_single(task, cfg.prompts_dir)
        self._use_relevance = cfg.relevance and client.capabilities.logprobs

    def _gen_config(self, sample: int) -> GenerateConfig:
        return GenerateConfig(
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_output_tokens,
            seed=self.cfg.seed + sample,
            response_model=JudgeVerdict,
        )

    async def judge_one(
        self, dossier: Dossier, sample: int, reply: GenerateResult | LLMError | None = None
    ) -> tuple[VerdictRecord, dict[str, Any]]:
        """One candidate, one sample: the record and the raw exchange. `reply` is the reply to the verdict
        request when it is already known (batch mode); otherwise the request is sent here."""
        cid = dossier.candidate.id
        ref = f"{EXCHANGES_FILE}#{cid}/{sample}"
        messages = build_messages(dossier, self.task, self.cfg, self.system)
        gcfg = self._gen_config(sample)
        exchange: dict[str, Any] = {
            "ref": ref,
            "candidate": cid,
            "sample": sample,
            "judge": self.client.model_id,
            "messages": [m.model_dump(mode="json", exclude_defaults=True) for m in messages],
            "replies": [],
        }
        rec = VerdictRecord(
            candidate=cid, judge=self.client.model_id, method="single", sample=sample, exchange=ref
        )
        try:
            if isinstance(reply, LLMError):
                raise reply
            res = reply if reply is not None else await self.client.generate(messages, gcfg)
        except StructuredOutputError as e:
            exchange["replies"].append(scrub(e.raw_text))
            rec.unscored = f"parse_failure: {scrub(str(e))[:300]}"
            return rec, exchange
        except (FatalError, BudgetExceededError):
            raise
        except LLMError as e:
            rec.unscored = f"provider_error: {type(e).__name__}: {scrub(str(e))[:300]}"
            return rec, exchange
        exchange["replies"].append(scrub(res.text))
        first, bad = check_evidence(res.parsed, dossier)
        verdict: JudgeVerdict | None = first
        if bad:
            verdict, bad, res = await self._repair_evidence(messages, res, dossier, bad, gcfg, exchange)
        if bad or verdict is None:
            rec.unscored = f"invalid_evidence: cited {bad} which the dossier does not hold"
            return rec, exchange
        rec.verdict = verdict
        if self._use_relevance:
            await self._relevance(rec, verdict, exchange)
        return rec, exchange

    async def _repair_evidence(
        self,
        messages: list[Message],
        res: GenerateResult,
        dossier: Dossier,
        bad: list[str],
        gcfg: GenerateConfig,
        exchange: dict[str, Any],
    ) -> tuple[JudgeVerdict | None, list[str], GenerateResult]:
        valid = ", ".join(sorted(safe_id(i) for i in dossier.evidence_ids()))
        fix = render_prompt("evidence_repair", self.cfg.prompts_dir, invalid=", ".join(bad), valid=valid)
        follow = [*messages, Message(role="assistant", content=res.text), Message(role="user", content=fix)]
        exchange["messages"].extend(m.model_dump(mode="json", exclude_defaults=True) for m in follow[-2:])
        try:
            res2 = await self.client.generate(follow, gcfg)
        except StructuredOutputError as e:
            exchange["replies"].append(scrub(e.raw_text))
            return None, bad, res
        exchange["replies"].append(scrub(res2.text))
        verdict, bad2 = check_evidence(res2.parsed, dossier)
        return verdict, bad2, res2

    async def _relevance(self, rec: VerdictRecord, verdict: JudgeVerdict, exchange: dict[str, Any]) -> None:
        undesired = "; ".join(self.task.undesired) or "anything the intended task does not need"
        text = render_prompt(
            "relevance",
            self.cfg.prompts_dir,
            label=verdict.label,
            description=verdict.description,
            intended=self.task.intended.strip(),
            undesired=undesired,
        )
        cfg = GenerateConfig(temperature=0.0, max_tokens=3, logprobs=True, top_logprobs=20, seed=0)
        try:
            res = await self.client.generate([Message(role="user", content=text)], cfg)
        except (FatalError, BudgetExceededError):
            raise
        except LLMError as e:
            rec.scores["relevance_error"] = 1.0
            exchange["relevance_error"] = f"{type(e).__name__}: {scrub(str(e))[:200]}"
            return
        score, mass = relevance_from_logprobs(res)
        rec.relevance = None if score is None else round(score, 3)
        rec.scores["relevance_mass"] = round(mass, 4)
        exchange["relevance_reply"] = scrub(res.text)

    async def run(self, dossiers: Sequence[Dossier], samples: int = 1) -> JudgeOutcome:
        from caft.agent.selection import load_verdicts

        outcome = JudgeOutcome(candidates=len(dossiers))
        if self.cfg.relevance and not self._use_relevance:
            outcome.relevance_skipped = f"{self.client.model_id} gives no logprobs"
            log.warning("relevance scores skipped: %s", outcome.relevance_skipped)
        vpath = self.out / VERDICTS_FILE
        done: set[tuple[str, int]] = set()
        wanted = {d.candidate.id for d in dossiers}
        if vpath.is_file():
            for r in load_verdicts(vpath):
                if r.judge != self.client.model_id or r.method != "single" or r.candidate not in wanted:
                    continue
                if r.sample >= samples:
                    continue
                if r.unscored is not None and r.unscored.startswith("provider_error"):
                    continue  # transient: try again
                done.add((r.candidate, r.sample))
                outcome.records.append(r)
                if r.unscored is not None:
                    outcome.unscored[r.unscored.split(":", 1)[0]] += 1
        todo = [(d, s) for d in dossiers for s in range(samples) if (d.candidate.id, s) not in done]
        outcome.resumed = len(dossiers) * samples - len(todo)
        if outcome.resumed:
            log.info("resuming: %d verdicts already on disk, %d to go", outcome.resumed, len(todo))
        # the first SIGINT / SIGTERM stops new requests (and a batch's polling: its ids are on disk, a rerun
        # polls the same batches); verdicts already written are kept and skipped on the rerun
        with SignalDrain(on_first=self.client.stop_retries) as drain:
            return await self._judge_todo(todo, outcome, vpath, drain)

    async def _judge_todo(
        self,
        todo: Sequence[tuple[Dossier, int]],
        outcome: JudgeOutcome,
        vpath: Path,
        drain: SignalDrain,
    ) -> JudgeOutcome:
        first: dict[tuple[str, int], GenerateResult | LLMError] = {}
        if self.cfg.batch and todo and self._has_batch_api():
            try:
                answered = await drain.cancel_on_signal(self._batch_first_round(todo))
            except BudgetExceededError as e:
                outcome.stopped = f"budget: {e}"
                log.warning("judging stopped at the budget before the batch was sent: %s", e)
                return outcome
            if answered is None:
                outcome.stopped = drain.reason
                log.warning(
                    "judging stopped (%s) while the batch ran; a rerun polls the same batch", drain.reason
                )
                return outcome
            first = answered
        # flushed per record (a crashed process loses nothing); one fsync at the end instead of one per record,
        # which would block the event loop for milliseconds per verdict
        with JsonlWriter(vpath, fsync=False) as vw, JsonlWriter(self.out / EXCHANGES_FILE, fsync=False) as xw:

            async def one(item: tuple[Dossier, int]) -> None:
                rec, exchange = await self.judge_one(*item, first.get((item[0].candidate.id, item[1])))
                xw.write(exchange)
                vw.write(rec.model_dump(mode="json"))
                outcome.records.append(rec)
                if rec.unscored is None:
                    outcome.judged += 1
                else:
                    outcome.unscored[rec.unscored.split(":", 1)[0]] += 1

            t0 = time.perf_counter()
            try:
                await bounded(
                    todo, one, self.client.max_concurrency, stopping=lambda: drain.reason is not None
                )
            except BudgetExceededError as e:
                outcome.stopped = f"budget: {e}"
                log.warning("judging stopped at the budget; %d verdicts kept: %s", len(outcome.records), e)
            if drain.reason is not None and outcome.stopped is None:
                outcome.stopped = drain.reason
                log.warning("judging stopped (%s); %d verdicts kept", drain.reason, len(outcome.records))
            outcome.seconds = time.perf_counter() - t0
        fsync_file(vpath)
        return outcome

    def _has_batch_api(self) -> bool:
        from caft.llm.batch import supports_batch

        if supports_batch(self.client.provider):
            return True
        log.warning("%s has no batch API; judging one request at a time", self.client.model_id)
        return False

    async def _batch_first_round(
        self, todo: Sequence[tuple[Dossier, int]]
    ) -> dict[tuple[str, int], GenerateResult | LLMError]:
        """The verdict requests of `todo` through the provider's batch API (`caft.llm.batch`): the same
        requests, replies, cache keys and records as one by one, at batch prices; resumable from
        `<out>/judge_batch/` (a rerun polls the batches already submitted)."""
        from caft.llm.batch import generate_all

        requests = [
            (build_messages(d, self.task, self.cfg, self.system), self._gen_config(s)) for d, s in todo
        ]
        t0 = time.perf_counter()
        results = await generate_all(
            self.client,
            requests,
            batch=True,
            state_dir=self.out / BATCH_DIR,
            stage="triage",
            poll_initial_s=self.cfg.batch_poll_s,
            poll_max_s=max(self.cfg.batch_poll_s, 300.0),
        )
        log.info("batch: %d verdict requests answered in %.0f s", len(results), time.perf_counter() - t0)
        return {(d.candidate.id, s): r for (d, s), r in zip(todo, results, strict=True)}


class SingleLLMJudge:
    """The `single` judge of the triage stage (the `Judge` contract): the LLM of `cfg.judge` gives one verdict
    per candidate and sample; control dossiers are judged the same way (the stage reports how often the
    judge calls a random direction undesired) and never selected."""

    def __init__(
        self, cfg: TriageConfig, *, provider: Provider | None = None, controls_per_layer: int = 0
    ) -> None:
        self.cfg = cfg
        self.provider = provider
        self.name = cfg.judge.model
        self.controls_per_layer = controls_per_layer

    async def judge(
        self,
        dossiers: Sequence[Dossier],
        task: TaskDescription,
        out_dir: Path,
        *,
        controls: Sequence[Dossier] = (),
        directions: Mapping[str, torch.Tensor] | None = None,
    ) -> JudgeRun:
        del directions  # a single-shot judge reads the dossier only
        cfg = self.cfg
        if cfg.samples > 1 and cfg.temperature == 0:
            log.warning(
                "samples=%d at temperature 0: the samples will barely differ; raise the temperature",
                cfg.samples,
            )
        client = open_client(cfg, out_dir, self.provider)
        self.name = client.model_id
        summary: dict[str, Any] = {}
        todo = [*prefilter(cfg, list(dossiers), out_dir, summary), *controls]
        async with client:
            try:
                outcome = await SingleJudge(client, task, cfg, out_dir).run(todo, samples=cfg.samples)
            except FatalError as e:
                raise refused(client.model_id, out_dir, e) from None
            summary |= outcome.summary()
            summary["usage"] = client.usage.model_dump(mode="json")
        judged = {r.candidate for r in outcome.records if r.verdict is not None or r.unscored is not None}
        complete = outcome.stopped is None and {d.candidate.id for d in todo} <= judged
        return JudgeRun(records=outcome.records, complete=complete, summary=summary)


def prefilter(
    cfg: TriageConfig, dossiers: list[Dossier], out: Path, summary: dict[str, Any]
) -> list[Dossier]:
    """The dossiers the LLM judges: all, or the top-k by the pre-filter's verdicts."""
    from caft.agent.selection import load_verdicts, prefilter_rank

    pf = cfg.prefilter
    if pf.top_k is None:
        return dossiers
    path = Path(pf.verdicts) if pf.verdicts is not None else out / VERDICTS_FILE
    if not path.is_file():
        raise DataError(f"prefilter: {path} not found; run the offline judge first or set prefilter.verdicts")
    ranked = prefilter_rank(load_verdicts(path), pf.method)
    if not ranked:
        raise DataError(f"prefilter: {path} holds no verdicts of method {pf.method!r}; run that judge first")
    keep = set(ranked[: pf.top_k])
    chosen = [d for d in dossiers if d.candidate.id in keep]
    summary["prefilter"] = {"method": pf.method, "kept": len(chosen), "skipped": len(dossiers) - len(chosen)}
    log.info(
        "prefilter: the LLM judges %d of %d candidates (top by %s)", len(chosen), len(dossiers), pf.method
    )
    return chosen
