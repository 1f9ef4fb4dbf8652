"""Batch grading: every (answer, metric) pair judged once, each result appended to `grades.jsonl` as it arrives.

Crash safety: a row is written (one line, flushed) the moment its judge reply is scored; a rerun reads the file,
skips the pairs already there and grades only the missing ones, so after a crash or `kill -9` the file ends with
exactly one row per pair. A torn last line from a kill mid-write is cut by `JsonlWriter` and that pair is graded
again. Rows from an earlier run with a different judge or prompt are refused rather than mixed.

Row fields: answer_id, question_id, metric, score (or null) and unscored_reason, scoring (the rule), judge,
prompt_hash, numeric_mass, top_logprobs (the raw alternatives) or replies (text rules), usage and cost, and the
input handling notes (answer_truncated_chars, input_replaced_bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from caft.evals.inputs import AnswerRow
from caft.evals.questions import check_template, prompt_hash, render_judge_prompt
from caft.evals.scoring import Outcome, ScoringRule, aggregate_logprobs, score_replies

from caft.env import scrub
from caft.errors import CaftError, DataError, RunDirError
from caft.llm import GenerateConfig, GenerateResult, LLMClient, Message
from caft.llm.types import BudgetExceededError, FatalError, LLMError
from caft.rundir import JsonlWriter, atomic_write_text, iter_jsonl

log = logging.getLogger(__name__)

GRADES_FILE = "grades.jsonl"
_FSYNC_EVERY_S = 1.0


class PromptBook:
    """Judge prompt templates by metric, with per-question overrides (a question file's `judge_prompts`)."""

    def __init__(
        self, defaults: Mapping[str, str], per_question: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        self.defaults = dict(defaults)
        self.per_question = {q: dict(p) for q, p in (per_question or {}).items()}

    def template(self, question_id: str, metric: str) -> str:
        own = self.per_question.get(question_id, {})
        if metric in own:
            return own[metric]
        if metric in self.defaults:
            return self.defaults[metric]
        raise DataError(
            f"no judge prompt for metric {metric!r} (question {question_id!r}); known metrics: "
            f"{', '.join(sorted(self.metrics()))}. Give a judge prompt file that defines it"
        )

    def metrics(self) -> set[str]:
        out = set(self.defaults)
        for p in self.per_question.values():
            out |= set(p)
        return out

    def check(self, rows: Iterable[AnswerRow], metrics: Sequence[str]) -> None:
        """Fail before any call when a metric lacks a prompt for some question, or a prompt is malformed."""
        seen: set[str] = set()
        for r in rows:
            if r.question_id in seen:
                continue
            seen.add(r.question_id)
            for m in metrics:
                check_template(self.template(r.question_id, m), f"judge prompt {m!r}")


@dataclass(frozen=True)
class GradeSettings:
    """Plain settings of one grading run (built from `GradeConfig` by the CLI and the eval)."""

    metrics: tuple[str, ...] = ("aligned", "coherent")
    rule: ScoringRule = "logprob_0_100"
    min_mass: float = 0.25
    top_logprobs: int = 20
    samples: int = 5
    sample_temperature: float = 1.0
    seed: int = 0
    retry_provider_errors: bool = True
    workers: int = 16
    """Pairs in flight at once (the client's own limit still applies below this)."""


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
    """Why the run stopped early (budget, fatal provider error), None when it finished."""
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


def resolve_rule(choice: str, client: LLMClient) -> ScoringRule:
    """`auto` -> the logprob rule when the judge gives logprobs, else sampled numbers (labelled as such)."""
    if choice == "auto":
        return "logprob_0_100" if client.capabilities.logprobs else "sampled_mean"
    if choice == "logprob_0_100" and not client.capabilities.logprobs:
        raise CaftError(
            "this judge gives no logprobs, so the logprob_0_100 rule cannot be used; choose "
            "--scoring sampled_mean or parsed_number (the rule is recorded on every row)"
        )
    if choice not in ("logprob_0_100", "sampled_mean", "parsed_number"):
        raise CaftError(f"unknown scoring rule {choice!r} (auto, logprob_0_100, sampled_mean, parsed_number)")
    return cast(ScoringRule, choice)


def read_done(
    path: Path,
    drop_reasons: Sequence[str] = (),
    check: Callable[[dict[tuple[str, str], dict[str, Any]]], None] | None = None,
) -> dict[tuple[str, str], dict[str, Any]]:
    """The rows already in `grades.jsonl`, keyed by (answer_id, metric). `check` sees them first (and may
    refuse the file). When some rows have a reason in `drop_reasons` (e.g. provider_error, to retry them) the
    file is rewritten without them, atomically, so that the rerun still leaves one row per pair."""
    if not path.exists():
        return {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    dup = 0
    for row in iter_jsonl(path):
        key = (str(row.get("answer_id")), str(row.get("metric")))
        if key in rows:
            dup += 1
        rows[key] = row
    if check is not None:
        check(rows)
    dropped = {k for k, r in rows.items() if r.get("unscored_reason") in drop_reasons}
    if dup or dropped:
        import json

        keep = [r for k, r in rows.items() if k not in dropped]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
        if dup:
            log.warning("%s: %d duplicate rows collapsed (last one kept)", path, dup)
        if dropped:
            log.info("%s: %d provider_error rows will be graded again", path, len(dropped))
        rows = {k: r for k, r in rows.items() if k not in dropped}
    return rows


def _check_consistent(
    done: Mapping[tuple[str, str], Mapping[str, Any]], judge: str, hashes: Mapping[str, set[str]], path: Path
) -> None:
    for (aid, metric), row in done.items():
        if row.get("judge") != judge:
            raise RunDirError(
                f"{path} already holds grades by judge {row.get('judge')!r} (e.g. answer {aid!r}, {metric}), "
                f"not {judge!r}. Use another --out folder, or `caft grade --rescore` to compare judges"
            )
        allowed = hashes.get(metric)
        if allowed is not None and row.get("prompt_hash") not in allowed:
            raise RunDirError(
                f"{path} holds {metric!r} grades made with another judge prompt (hash {row.get('prompt_hash')}); "
                "use another --out folder so grades from different prompts are not mixed"
            )


class _Progress:
    """A tqdm bar with rate, ETA and running dollars (silent when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="grade", dynamic_ncols=True, smoothing=0.1)

    def update(self, cost: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"${cost:.4f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Syncer:
    """Rows are flushed per write (safe against a killed process); fsync (safe against power loss) runs at
    most once a second, off the event loop, so a slow disk does not throttle the judge calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def _fsync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def maybe(self) -> None:
        now = time.monotonic()
        if now - self.last >= _FSYNC_EVERY_S and (self.task is None or self.task.done()):
            self.last = now
            self.task = asyncio.ensure_future(asyncio.to_thread(self._fsync))

    async def final(self) -> None:
        if self.task is not None:
            with contextlib.suppress(OSError):
                await self.task
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._fsync)


async def _judge(
    client: LLMClient, prompt: str, s: GradeSettings
) -> tuple[Outcome, dict[str, Any], list[GenerateResult]]:
    messages = [Message(role="user", content=prompt)]
    if s.rule == "logprob_0_100":
        cfg = GenerateConfig(
            temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=s.top_logprobs, seed=s.seed
        )
        res = await client.generate(messages, cfg)
        if not res.logprobs:
            return (
                Outcome(None, "parse_failure"),
                {"reply": res.text, "error": "judge returned no logprobs"},
                [res],
            )
        first = res.logprobs[0]
        top = [(t.token, t.logprob) for t in first.top] or [(first.token, first.logprob)]
        outcome = aggregate_logprobs(top, s.min_mass, sampled_token=first.token)
        return outcome, {"reply": res.text, "top_logprobs": [[t, round(lp, 6)] for t, lp in top]}, [res]
    n = 1 if s.rule == "parsed_number" else s.samples
    temp = 0.0 if s.rule == "parsed_number" else s.sample_temperature
    cfgs = [GenerateConfig(temperature=temp, max_tokens=8, seed=s.seed + i) for i in range(n)]
    results = await asyncio.gather(*(client.generate(messages, c) for c in cfgs))
    texts = [r.text for r in results]
    outcome = score_replies(texts, s.rule)
    return outcome, {"replies": texts, "parsed": outcome.parsed}, list(results)


def _usage(results: Sequence[GenerateResult]) -> dict[str, Any]:
    costs = [r.usage.cost_usd for r in results]
    return {
        "input_tokens": sum(r.usage.input_tokens for r in results),
        "output_tokens": sum(r.usage.output_tokens for r in results),
        "cost_usd": None if any(c is None for c in costs) else round(sum(c or 0.0 for c in costs), 8),
        "cached": all(r.cached for r in results),
    }


async def grade_async(
    rows: Sequence[AnswerRow],
    prompts: PromptBook,
    client: LLMClient,
    out_path: str | Path,
    settings: GradeSettings,
    judge_id: str,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    handle_signals: bool = True,
) -> GradeReport:
    """Grade every (answer, metric) pair missing from `out_path`; see the module docstring.

    With `handle_signals` (main thread only), the first SIGINT or SIGTERM stops dispatching new pairs and lets
    the calls in flight finish and be written (they are paid for), then returns with `stopped` set; a second
    signal interrupts at once. A SIGKILL cannot be caught: the calls in flight then are lost, and at most
    `workers` requests are sent twice across the kill and the rerun."""
    t0 = time.monotonic()
    out = Path(out_path)
    prompts.check(rows, settings.metrics)
    hashes: dict[str, set[str]] = {m: set() for m in settings.metrics}
    for r in rows:
        for m in settings.metrics:
            hashes[m].add(prompt_hash(prompts.template(r.question_id, m)))
    drop = ("provider_error",) if settings.retry_provider_errors else ()
    done = read_done(out, drop, check=lambda old: _check_consistent(old, judge_id, hashes, out))
    todo = [(r, m) for r in rows for m in settings.metrics if (r.id, m) not in done]
    report = GradeReport(
        out,
        total_pairs=len(rows) * len(settings.metrics),
        already_done=len(rows) * len(settings.metrics) - len(todo),
    )
    if not todo:
        report.seconds = time.monotonic() - t0
        return report

    queue: asyncio.Queue[tuple[AnswerRow, str]] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    bar = _Progress(len(todo), progress)
    stop: list[str] = []
    syncer = _Syncer(out)
    writer = JsonlWriter(out, fsync=False)

    def emit(row: dict[str, Any]) -> None:
        writer.write(row)
        report.graded += 1
        if row["score"] is None:
            report.unscored[row["unscored_reason"]] += 1
        report.cost_usd += row.get("cost_usd") or 0.0
        bar.update(report.cost_usd)
        syncer.maybe()
        if on_row is not None:
            on_row(row)

    async def worker() -> None:
        while not stop:
            try:
                answer, metric = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            template = prompts.template(answer.question_id, metric)
            base: dict[str, Any] = {
                "answer_id": answer.id,
                "question_id": answer.question_id,
                "metric": metric,
                "judge": judge_id,
                "prompt_hash": prompt_hash(template),
                "scoring": settings.rule,
                **answer.notes(),
            }
            if answer.empty:
                emit({**base, "score": None, "unscored_reason": "empty_answer", "cost_usd": 0.0})
                continue
            prompt = render_judge_prompt(template, answer.question, answer.answer)
            try:
                outcome, raw, results = await _judge(client, prompt, settings)
            except BudgetExceededError as e:
                stop.append(f"budget: {e}")
                return
            except FatalError as e:
                stop.append(f"fatal provider error: {scrub(str(e))}")
                return
            except LLMError as e:
                emit(
                    {
                        **base,
                        "score": None,
                        "unscored_reason": "provider_error",
                        "error": scrub(f"{type(e).__name__}: {e}")[:2000],
                        "cost_usd": 0.0,
                    }
                )
                continue
            emit(
                {
                    **base,
                    "score": None if outcome.score is None else round(outcome.score, 6),
                    "unscored_reason": outcome.reason,
                    "numeric_mass": None if outcome.numeric_mass is None else round(outcome.numeric_mass, 6),
                    **raw,
                    **_usage(results),
                }
            )

    installed = _drain_on_signals(stop) if handle_signals else []
    try:
        n = max(1, min(settings.workers, len(todo)))
        await asyncio.gather(*(worker() for _ in range(n)))
    finally:
        _restore_signals(installed)
        writer.close()
        await syncer.final()
        bar.close()
    report.stopped = stop[0] if stop else None
    report.seconds = time.monotonic() - t0
    return report


def _drain_on_signals(stop: list[str]) -> list[int]:
    loop = asyncio.get_running_loop()
    installed: list[int] = []

    def on_signal(signum: int) -> None:
        if stop and stop[0].startswith("interrupted"):
            raise KeyboardInterrupt
        log.warning("signal %d: finishing the calls in flight, then stopping (again to stop at once)", signum)
        stop.insert(0, f"interrupted by signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, int(sig))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no Unix signals
            continue
        installed.append(int(sig))
    return installed


def _restore_signals(installed: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for sig in installed:
        loop.remove_signal_handler(sig)


def grade(
    rows: Sequence[AnswerRow],
    prompts: PromptBook,
    client: LLMClient,
    out_path: str | Path,
    settings: GradeSettings,
    judge_id: str,
    progress: bool = True,
) -> GradeReport:
    """Synchronous wrapper of `grade_async` (closes the client's connections at the end)."""

    async def run() -> GradeReport:
        try:
            return await grade_async(rows, prompts, client, out_path, settings, judge_id, progress)
        finally:
            await client.aclose()

    return asyncio.run(run())


def pending_pairs(
    rows: Sequence[AnswerRow], metrics: Sequence[str], out_path: str | Path
) -> list[tuple[AnswerRow, str]]:
    """(answer, metric) pairs not yet in `out_path` (read only; nothing is rewritten)."""
    out = Path(out_path)
    done: set[tuple[str, str]] = set()
    if out.exists():
        done = {
            (str(r.get("answer_id")), str(r.get("metric")))
            for r in iter_jsonl(out)
            if r.get("unscored_reason") != "provider_error"
        }
    return [(r, m) for r in rows for m in metrics if (r.id, m) not in done]


def estimate(
    rows: Sequence[AnswerRow],
    prompts: PromptBook,
    settings: GradeSettings,
    judge_model: str,
    out_path: str | Path,
    prices_path: str | Path | None = None,
) -> dict[str, Any]:
    """What `--dry-run` prints: calls, estimated tokens and dollars for the pairs still to grade.

    Tokens are estimated at 4 characters per token (English text with typical tokenizers), so the dollars
    are a rough guide; the judge's own accounting is exact once the run starts."""
    from caft.llm.prices import find_price, load_prices

    prompts.check(rows, settings.metrics)
    todo = pending_pairs(rows, settings.metrics, out_path)
    calls_per_pair = settings.samples if settings.rule == "sampled_mean" else 1
    out_tokens_per_call = 1 if settings.rule == "logprob_0_100" else 4
    calls = 0
    in_chars = 0
    skipped_empty = 0
    for answer, metric in todo:
        if answer.empty:
            skipped_empty += 1
            continue
        text = render_judge_prompt(
            prompts.template(answer.question_id, metric), answer.question, answer.answer
        )
        calls += calls_per_pair
        in_chars += len(text) * calls_per_pair
    input_tokens = (in_chars + 3) // 4 + 8 * calls  # + chat framing per request
    output_tokens = calls * out_tokens_per_call
    provider, _, model = judge_model.partition("/")
    price = find_price(load_prices(prices_path), provider, model)
    return {
        "judge": judge_model,
        "scoring": settings.rule,
        "pairs_total": len(rows) * len(settings.metrics),
        "pairs_to_grade": len(todo),
        "empty_answers_no_call": skipped_empty,
        "calls": calls,
        "est_input_tokens": input_tokens,
        "est_output_tokens": output_tokens,
        "est_cost_usd": None if price is None else round(price.cost(input_tokens, output_tokens), 4),
    }
