"""The batch path of grading (`grade.batch: true`): every pair's judge requests through the provider's batch
API (`caft.llm.batch`), half the price, results within the provider's window. The rows are those of the
one-by-one path (`caft.evals.grade_judge` builds both)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from caft.evals.config import GradeConfig
from caft.evals.grade_judge import error_fields, judge_configs, outcome_fields, score, stop_reason
from caft.evals.scoring import ScoringRule
from caft.llm import GenerateConfig, GenerateResult, LLMClient, Message
from caft.llm.batch import BatchPendingError
from caft.llm.client import RetriesStoppedError
from caft.llm.types import LLMError
from caft.rundir import SignalDrain

log = logging.getLogger(__name__)

BATCH_DIR = "judge_batch"
"""Folder next to grades.jsonl holding the provider batch state (`caft.llm.batch`) in batch mode."""

__all__ = ["BATCH_DIR", "grade_batched", "has_batch_api"]


def has_batch_api(client: LLMClient) -> bool:
    """Whether `client`'s provider has a batch API (else grading falls back to one request at a time)."""
    from caft.llm.batch import supports_batch

    if supports_batch(client.provider):
        return True
    log.warning("%s has no batch API; grading one request at a time", client.model_id)
    return False


async def grade_batched(
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
    """Grade `pairs` (each: its row's fields, and its judge prompt or None for an empty answer) in one
    provider batch; the rows are written once the batch has ended. A signal stops the polling (the batch ids
    are on disk in `state_dir`: a rerun polls the same batches, submitting nothing twice)."""
    from caft.llm.batch import generate_all

    gens = judge_configs(cfg, rule)
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
    try:
        results = await drain.cancel_on_signal(
            generate_all(
                client,
                requests,
                batch=True,
                state_dir=state_dir,
                stage="grade",
                poll_initial_s=cfg.batch_poll_s,
                poll_max_s=max(cfg.batch_poll_s, 300.0),
                max_wait_s=cfg.batch_max_wait_s,
            )
        )
    except BatchPendingError as e:
        stop.append(f"batch pending: {e}")
        return
    except LLMError as e:
        reason = stop_reason(e, secrets)
        if reason is None:
            raise
        stop.append(reason)
        return
    if results is None:
        return  # stopped by a signal: nothing is written, the rerun resumes the batch
    for base, start in spans:
        chunk = results[start : start + len(gens)]
        errors = [r for r in chunk if isinstance(r, LLMError)]
        if any(isinstance(e, RetriesStoppedError) for e in errors):
            continue  # the run is stopping: the pair stays missing and a rerun grades it
        if errors:
            emit(**base, **error_fields(errors[0], secrets))
            continue
        replies = [r for r in chunk if isinstance(r, GenerateResult)]
        outcome, raw = score(replies, cfg, rule, secrets)
        emit(**base, **outcome_fields(outcome, raw, replies))
