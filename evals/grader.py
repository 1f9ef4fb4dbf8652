"""Batch grading: every (answer, metric) pair judged once, each result appended to `grades.jsonl` as it arrives.

Crash safety: a row is written (one line, flushed) the moment its judge reply is scored; a rerun reads the file,
skips the pairs already there and grades only the missing ones, so after a crash or `kill -9` the file ends with
exactly one row per pair. A torn last line from a kill mid-write is cut by `JsonlWriter` and that pair is graded
again. Rows from an earlier run with a different judge or prompt are refused rather than mixed. One process at
a time writes a folder (`caft.rundir.lock_dir`).

Rows are `caft.evals.schema.GradeRow`s; judge replies are passed through `caft.env.scrub` before they are
stored, so a reply that echoes a key never reaches the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caft.env import scrub, secret_values
from caft.errors import CaftError, RunDirError
from caft.evals.config import GradeConfig
from caft.evals.inputs import AnswerRow
from caft.evals.progress import Progress
from caft.evals.prompt_book import PromptBook
from caft.evals.questions import prompt_hash, render_judge_prompt
from caft.evals.schema import GradeRow, iter_grades
from caft.evals.scoring import Outcome, ScoringRule, aggregate_logprobs, score_replies
from caft.llm import GenerateConfig, GenerateResult, LLMClient, Message
from caft.llm.client import RetriesStoppedError
from caft.llm.types import BudgetExceededError, Capabilities, FatalError, LLMError
from caft.rundir import FsyncThrottle, JsonlWriter, SignalDrain, atomic_write_text, lock_dir

log = logging.getLogger(__name__)

BATCH_DIR = "judge_batch"
"""Folder next to grades.jsonl holding the provider batch state (`caft.llm.batch`) in batch mode."""

__all__ = [
    "GradeReport",
    "PromptBook",
    "estimate",
    "grade",
    "grade_async",
    "pending_pairs",
    "read_done",
    "resolve_scoring_rule",
]

_RULES: tuple[ScoringRule, ...] = ("logprob_0_100", "sampled_mean", "parsed_number")


def resolve_scoring_rule(choice: str, capabilities: Capabilities) -> ScoringRule:
    """The rule a judge with `capabilities` grades by. `auto` -> the logprob rule when the judge gives
    logprobs, else sampled numbers (labelled as such). The dry run and the run both decide here."""
    if choice == "auto":
        return "logprob_0_100" if capabilities.logprobs else "sampled_mean"
    if choice == "logprob_0_100" and not capabilities.logprobs:
        raise CaftError(
            "this judge gives no logprobs, so the logprob_0_100 rule cannot be used; choose "
            "--scoring sampled_mean or parsed_number (the rule is recorded on every row)"
        )
    for rule in _RULES:
        if choice == rule:
            return rule
    raise CaftError(f"unknown scoring rule {choice!r} (auto, logprob_0_100, sampled_mean, parsed_number)")


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


def read_done(
    path: Path,
    drop_reasons: Sequence[str] = (),
    check: Callable[[Mapping[tuple[str, str], GradeRow]], None] | None = None,
) -> dict[tuple[str, str], GradeRow]:
    """The rows already in `grades.jsonl`, keyed by (answer_id, metric). `check` sees them first (and may
    refuse the file). When some rows have a reason in `drop_reasons` (e.g. provider_error, to retry them) the
    file is rewritten without them, atomically, so that the rerun still leaves one row per pair."""
    if not path.exists():
        return {}
    rows: dict[tuple[str, str], GradeRow] = {}
    dup = 0
    for row in iter_grades(path):
        if row.key in rows:
            dup += 1
        rows[row.key] = row
    if check is not None:
        check(rows)
    dropped = {k for k, r in rows.items() if r.unscored_reason in drop_reasons}
    if dup or dropped:
        keep = [r for k, r in rows.items() if k not in dropped]
        atomic_write_text(path, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in keep))
        if dup:
            log.warning("%s: %d duplicate rows collapsed (last one kept)", path, dup)
        if dropped:
            log.info("%s: %d provider_error rows will be graded again", path, len(dropped))
        rows = {k: r for k, r in rows.items() if k not in dropped}
    return rows


def _check_consistent(
    done: Mapping[tuple[str, str], GradeRow], judge: str, hashes: Mapping[str, set[str]], path: Path
) -> None:
    for (aid, metric), row in done.items():
        if row.judge != judge:
            raise RunDirError(
                f"{path} already holds grades by judge {row.judge!r} (e.g. answer {aid!r}, {metric}), "
                f"not {judge!r}. Use another --out folder, or `caft grade --rescore` to compare judges"
            )
        allowed = hashes.get(metric)
        if allowed is not None and row.prompt_hash not in allowed:
            raise RunDirError(
                f"{path} holds {metric!r} grades made with another judge prompt (hash {row.prompt_hash}); "
                "use another --out folder so grades from different prompts are not mixed"
            )


def _judge_configs(cfg: GradeConfig, rule: ScoringRule) -> list[GenerateConfig]:
    """The judge requests of one (answer, metric) pair under `rule` (one, or `samples` sampled replies)."""
    if rule == "logprob_0_100":
        return [
            GenerateConfig(
                temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=cfg.top_logprobs, seed=cfg.seed
            )
        ]
    n = 1 if rule == "parsed_number" else cfg.samples
    temp = 0.0 if rule == "parsed_number" else cfg.sample_temperature
    return [GenerateConfig(temperature=temp, max_tokens=8, seed=cfg.seed + i) for i in range(n)]


def _score(
    results: Sequence[GenerateResult], cfg: GradeConfig, rule: ScoringRule, secrets: list[str]
) -> tuple[Outcome, dict[str, Any]]:
    """The outcome and the raw fields of a row, from the replies to `_judge_configs`' requests."""
    if rule == "logprob_0_100":
        res = results[0]
        reply = scrub(res.text, secrets)
        if not res.logprobs:
            return Outcome(None, "parse_failure"), {"reply": reply, "error": "judge returned no logprobs"}
        first = res.logprobs[0]
        top = [(t.token, t.logprob) for t in first.top] or [(first.token, first.logprob)]
        outcome = aggregate_logprobs(top, cfg.min_numeric_mass, sampled_token=first.token)
        raw = {"reply": reply, "top_logprobs": [(scrub(t, secrets), round(lp, 6)) for t, lp in top]}
        return outcome, raw
    texts = [r.text for r in results]
    outcome = score_replies(texts, rule)
    return outcome, {"replies": [scrub(t, secrets) for t in texts], "parsed": outcome.parsed}


async def _judge(
    client: LLMClient, prompt: str, cfg: GradeConfig, rule: ScoringRule, secrets: list[str]
) -> tuple[Outcome, dict[str, Any], list[GenerateResult]]:
    messages = [Message(role="user", content=prompt)]
    gens = _judge_configs(cfg, rule)
    results = list(await asyncio.gather(*(client.generate(messages, g) for g in gens)))
    outcome, raw = _score(results, cfg, rule, secrets)
    return outcome, raw, results


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
    done = read_done(out, drop, check=lambda old: _check_consistent(old, judge_id, hashes, out))
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
                outcome, raw, results = await _judge(client, prompt, cfg, rule, secrets)
            except BudgetExceededError as e:
                stop.append(f"budget: {e}")
                return
            except FatalError as e:
                stop.append(f"fatal provider error: {scrub(str(e), secrets)}")
                return
            except RetriesStoppedError:
                continue  # the run is stopping: the pair stays missing and a rerun grades it
            except LLMError as e:
                error = scrub(f"{type(e).__name__}: {e}", secrets)[:2000]
                emit(**base, score=None, unscored_reason="provider_error", error=error)
                continue
            emit(
                **base,
                score=None if outcome.score is None else round(outcome.score, 6),
                unscored_reason=outcome.reason,
                numeric_mass=None if outcome.numeric_mass is None else round(outcome.numeric_mass, 6),
                **raw,
                **_usage(results),
            )

    try:
        with drain:
            if cfg.batch and _has_batch_api(client):
                pairs = [row_base(a, m) for a, m in todo]
                await _batched(pairs, client, cfg, rule, secrets, out.parent / BATCH_DIR, emit, stop, drain)
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


def _has_batch_api(client: LLMClient) -> bool:
    from caft.llm.batch import supports_batch

    if supports_batch(client.provider):
        return True
    log.warning("%s has no batch API; grading one request at a time", client.model_id)
    return False


async def _batched(
    pairs: Sequence[tuple[dict[str, Any], str | None]],
    client: LLMClient,
    cfg: GradeConfig,
    rule: ScoringRule,
    secrets: list[str],
    state_dir: Path,
    emit: Callable[..., None],
    stop: list[str],
    drain: SignalDrain,
) -> None:
    """Every pair's requests through the provider's batch API (`caft.llm.batch`); the rows are those of the
    one-by-one path, written once the batch has ended. A signal stops the polling (the batch ids are on
    disk: a rerun polls the same batches, submitting nothing twice)."""
    from caft.llm.batch import generate_all

    gens = _judge_configs(cfg, rule)
    requests: list[tuple[list[Message], GenerateConfig]] = []
    spans: list[tuple[dict[str, Any], int]] = []
    for base, prompt in pairs:
        if prompt is None:
            emit(**base, score=None, unscored_reason="empty_answer")
            continue
        spans.append((base, len(requests)))
        messages = [Message(role="user", content=prompt)]
        requests.extend((messages, g) for g in gens)
    if not requests:
        return
    task = asyncio.ensure_future(
        generate_all(
            client,
            requests,
            batch=True,
            state_dir=state_dir,
            stage="grade",
            poll_initial_s=cfg.batch_poll_s,
            poll_max_s=max(cfg.batch_poll_s, 300.0),
        )
    )

    def cancel() -> None:
        task.cancel()

    drain.add_callback(cancel)
    try:
        results = await task
    except asyncio.CancelledError:
        if drain.reason is None:
            raise
        return  # stopped by a signal: nothing is written, the rerun resumes the batch
    except BudgetExceededError as e:
        stop.append(f"budget: {e}")
        return
    except FatalError as e:
        stop.append(f"fatal provider error: {scrub(str(e), secrets)}")
        return
    for base, start in spans:
        chunk = results[start : start + len(gens)]
        errors = [r for r in chunk if isinstance(r, LLMError)]
        if any(isinstance(e, RetriesStoppedError) for e in errors):
            continue  # the run is stopping: the pair stays missing and a rerun grades it
        if errors:
            error = scrub(f"{type(errors[0]).__name__}: {errors[0]}", secrets)[:2000]
            emit(**base, score=None, unscored_reason="provider_error", error=error)
            continue
        replies = [r for r in chunk if isinstance(r, GenerateResult)]
        outcome, raw = _score(replies, cfg, rule, secrets)
        emit(
            **base,
            score=None if outcome.score is None else round(outcome.score, 6),
            unscored_reason=outcome.reason,
            numeric_mass=None if outcome.numeric_mass is None else round(outcome.numeric_mass, 6),
            **raw,
            **_usage(replies),
        )


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


def pending_pairs(
    rows: Sequence[AnswerRow], metrics: Sequence[str], out_path: str | Path
) -> list[tuple[AnswerRow, str]]:
    """(answer, metric) pairs not yet in `out_path` (read only; nothing is rewritten)."""
    out = Path(out_path)
    done: set[tuple[str, str]] = set()
    if out.exists():
        done = {r.key for r in iter_grades(out) if r.unscored_reason != "provider_error"}
    return [(r, m) for r in rows for m in metrics if (r.id, m) not in done]


def estimate(
    rows: Sequence[AnswerRow],
    prompts: PromptBook,
    cfg: GradeConfig,
    capabilities: Capabilities,
    out_path: str | Path,
    metrics: Sequence[str] | None = None,
) -> dict[str, Any]:
    """What `--dry-run` prints: calls, estimated tokens and dollars for the pairs still to grade, under the
    scoring rule the run would use with a judge of these `capabilities`.

    Tokens are estimated at 4 characters per token (English text with typical tokenizers), so the dollars
    are a rough guide; the judge's own accounting is exact once the run starts."""
    from caft.llm.prices import find_price, load_prices

    rule = resolve_scoring_rule(cfg.scoring, capabilities)
    use = tuple(metrics or cfg.metrics)
    prompts.check(rows, use)
    todo = pending_pairs(rows, use, out_path)
    calls_per_pair = cfg.samples if rule == "sampled_mean" else 1
    out_tokens_per_call = 1 if rule == "logprob_0_100" else 4
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
    provider, _, model = cfg.judge.model.partition("/")
    price = find_price(load_prices(cfg.judge.prices_path), provider, model)
    if price is not None and cfg.batch:
        price = price.batch()
    return {
        "judge": cfg.judge.model,
        "scoring": rule,
        "pairs_total": len(rows) * len(use),
        "pairs_to_grade": len(todo),
        "empty_answers_no_call": skipped_empty,
        "calls": calls,
        "est_input_tokens": input_tokens,
        "est_output_tokens": output_tokens,
        "est_cost_usd": None if price is None else round(price.cost(input_tokens, output_tokens), 4),
        "batch": cfg.batch,
    }


def judge_capabilities(cfg: GradeConfig) -> Capabilities:
    """What the configured judge can do, from the provider the run would build (a key is needed as for the
    run; nothing is sent)."""
    from caft.llm.registry import get_provider

    provider = get_provider(
        cfg.judge.model,
        base_url=cfg.judge.base_url,
        api_key_env=cfg.judge.api_key_env,
        timeout_s=cfg.judge.timeout_s,
    )
    caps = provider.capabilities
    with contextlib.suppress(Exception):  # the unused SDK client holds no connection; closing is tidiness
        asyncio.run(provider.aclose())
    return caps
