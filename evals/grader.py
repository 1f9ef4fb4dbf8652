"""Batch grading: every (answer, metric) pair judged once, each result appended to `grades.jsonl` as it arrives.

Crash safety: a row is written (one line, flushed) the moment its judge reply is scored; a rerun reads the file,
skips the pairs already there and grades only the missing ones, so after a crash or `kill -9` the file ends with
exactly one row per pair. A torn last line from a kill mid-write is cut by `JsonlWriter` and that pair is graded
again. Rows from an earlier run with a different judge or prompt are refused rather than mixed. One process at
a time writes a folder (`caft.rundir.lock_dir`).

Rows are `caft.evals.schema.GradeRow`s; judge replies are passed through `caft.env.scrub` before they are
stored, so a reply that echoes a key never reaches the file.

The pieces: `caft.evals.grade_judge` (the scoring rule, one pair's requests and row fields),
`caft.evals.grade_state` (what the file already holds), `caft.evals.grade_batch` (the provider batch path),
`caft.evals.grade_estimate` (the dry run). Their public names are importable from here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caft.env import secret_values
from caft.evals.config import GradeConfig
from caft.evals.grade_batch import BATCH_DIR, grade_batched, has_batch_api
from caft.evals.grade_estimate import estimate, judge_capabilities
from caft.evals.grade_judge import error_fields, judge, outcome_fields, resolve_scoring_rule, stop_reason
from caft.evals.grade_state import check_consistent, pending_pairs, read_done
from caft.evals.inputs import AnswerRow
from caft.evals.progress import Progress
from caft.evals.prompt_book import PromptBook
from caft.evals.questions import prompt_hash, render_judge_prompt
from caft.evals.schema import GradeRow
from caft.llm import LLMClient
from caft.llm.client import RetriesStoppedError
from caft.llm.types import LLMError
from caft.rundir import FsyncThrottle, JsonlWriter, SignalDrain, lock_dir

log = logging.getLogger(__name__)

__all__ = [
    "BATCH_DIR",
    "GradeReport",
    "PromptBook",
    "estimate",
    "grade",
    "grade_async",
    "judge_capabilities",
    "pending_pairs",
    "read_done",
    "resolve_scoring_rule",
]


@dataclass
class GradeReport:
    """What one grading call did (the rows themselves are in the file)."""

    out_path: Path
    total_pairs: int
    already_done: int
    graded: int = 0
    unscored: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0
    stopped: str | None = None
    """Why the run stopped early (budget, fatal provider error, a signal), None when it finished."""
    seconds: float = 0.0

    @property
    def missing(self) -> int:
        return self.total_pairs - self.already_done - self.graded

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_path": str(self.out_path),
            "total_pairs": self.total_pairs,
            "already_done": self.already_done,
            "graded": self.graded,
            "missing": self.missing,
            "unscored": dict(self.unscored),
            "cost_usd": round(self.cost_usd, 6),
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
        }


async def grade_async(
    rows: Sequence[AnswerRow],
    prompts: PromptBook,
    client: LLMClient,
    out_path: str | Path,
    cfg: GradeConfig,
    *,
    judge_id: str | None = None,
    metrics: Sequence[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    on_row: Callable[[GradeRow], None] | None = None,
    handle_signals: bool = True,
) -> GradeReport:
    """Grade every (answer, metric) pair missing from `out_path` under `cfg`; see the module docstring.

    `judge_id` (default: the client's model id) is recorded on every row; `metrics` overrides `cfg.metrics`;
    `workers` pairs are in flight at once (default: twice the client's concurrency). The folder of
    `out_path` is locked for the run (`caft.rundir.lock_dir`).

    With `handle_signals` (main thread only), the first SIGINT or SIGTERM stops dispatching new pairs, stops
    the retries of failing calls (`LLMClient.stop_retries`) and lets the attempts in flight finish and be
    written (they are paid for), then returns with `stopped` set; so the process ends within one request
    timeout. A second signal interrupts at once. A SIGKILL cannot be caught: the calls in flight then are
    lost, and at most `workers` requests are sent twice across the kill and the rerun."""
    t0 = time.monotonic()
    out = Path(out_path)
    with lock_dir(out.parent, f"grading {out.name}"):
        return await _grade_locked(
            rows,
            prompts,
            client,
            out,
            cfg,
            judge_id or client.model_id,
            tuple(metrics or cfg.metrics),
            workers or max(client.max_concurrency, 1) * 2,
            progress,
            on_row,
            handle_signals,
            t0,
        )


async def _grade_locked(
    rows: Sequence[AnswerRow],
    prompts: PromptBook,
    client: LLMClient,
    out: Path,
    cfg: GradeConfig,
    judge_id: str,
    metrics: tuple[str, ...],
    workers: int,
    progress: bool,
    on_row: Callable[[GradeRow], None] | None,
    handle_signals: bool,
    t0: float,
) -> GradeReport:
    rule = resolve_scoring_rule(cfg.scoring, client.capabilities)
    prompts.check(rows, metrics)
    hashes = prompts.hashes(rows, metrics)
    drop = ("provider_error",) if cfg.retry_provider_errors else ()
    done = read_done(out, drop, check=lambda old: check_consistent(old, judge_id, hashes, out))
    todo = [(r, m) for r in rows for m in metrics if (r.id, m) not in done]
    total = len(rows) * len(metrics)
    report = GradeReport(out, total_pairs=total, already_done=total - len(todo))
    if not todo:
        report.seconds = time.monotonic() - t0
        return report

    queue: asyncio.Queue[tuple[AnswerRow, str]] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    bar = Progress(len(todo), progress)
    stop: list[str] = []
    secrets = secret_values()
    syncer = FsyncThrottle(out)
    writer = JsonlWriter(out, fsync=False)
    drain = SignalDrain(on_first=client.stop_retries, enabled=handle_signals)

    def emit(**fields: Any) -> None:
        row = GradeRow.model_validate(fields)
        writer.write(row.to_json())
        report.graded += 1
        if row.unscored_reason is not None:
            report.unscored[row.unscored_reason] += 1
        report.cost_usd += row.cost_usd or 0.0
        bar.update(report.cost_usd)
        syncer.maybe()
        if on_row is not None:
            on_row(row)

    def row_base(answer: AnswerRow, metric: str) -> tuple[dict[str, Any], str | None]:
        """The fields every row of this pair has, and the judge prompt (None for an empty answer)."""
        template = prompts.template(answer.question_id, metric)
        base: dict[str, Any] = {
            "answer_id": answer.id,
            "question_id": answer.question_id,
            "metric": metric,
            "judge": judge_id,
            "prompt_hash": prompt_hash(template),
            "scoring": rule,
            **answer.notes(),
        }
        if answer.empty:
            return base, None
        return base, render_judge_prompt(template, answer.question, answer.answer)

    async def worker() -> None:
        while not stop and drain.reason is None:
            try:
                answer, metric = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            base, prompt = row_base(answer, metric)
            if prompt is None:
                emit(**base, score=None, unscored_reason="empty_answer")
                continue
            try:
                outcome, raw, results = await judge(client, prompt, cfg, rule, secrets)
            except RetriesStoppedError:
                continue  # the run is stopping: the pair stays missing and a rerun grades it
            except LLMError as e:
                reason = stop_reason(e, secrets)
                if reason is not None:
                    stop.append(reason)
                    return
                emit(**base, **error_fields(e, secrets))
                continue
            emit(**base, **outcome_fields(outcome, raw, results))

    try:
        with drain:
            if cfg.batch and has_batch_api(client):
                pairs = [row_base(a, m) for a, m in todo]
                await grade_batched(
                    pairs, client, cfg, rule, secrets, out.parent / BATCH_DIR, emit, stop, drain
                )
            else:
                n = max(1, min(workers, len(todo)))
                await asyncio.gather(*(worker() for _ in range(n)))
    finally:
        writer.close()
        await syncer.final()
        bar.close()
    reasons = ([drain.reason] if drain.reason else []) + stop
    report.stopped = reasons[0] if reasons else None
    report.seconds = time.monotonic() - t0
    return report


def grade(
    rows: Sequence[AnswerRow],
    prompts: PromptBook,
    client: LLMClient,
    out_path: str | Path,
    cfg: GradeConfig,
    *,
    judge_id: str | None = None,
    metrics: Sequence[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> GradeReport:
    """Synchronous wrapper of `grade_async` (closes the client's connections at the end)."""

    async def run() -> GradeReport:
        try:
            return await grade_async(
                rows,
                prompts,
                client,
                out_path,
                cfg,
                judge_id=judge_id,
                metrics=metrics,
                workers=workers,
                progress=progress,
            )
        finally:
            await client.aclose()

    return asyncio.run(run())
