"""One (answer, metric) pair before the judge: the scoring rule, the requests it sends, and the row fields
its replies (or its error) become. Shared by the one-by-one path (`caft.evals.grader`) and the batch path
(`caft.evals.grade_batch`), so both write the same rows."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from caft.env import scrub
from caft.errors import CaftError
from caft.evals.config import GradeConfig
from caft.evals.scoring import Outcome, ScoringRule, aggregate_logprobs, score_replies
from caft.llm import GenerateConfig, GenerateResult, LLMClient, Message
from caft.llm.types import BudgetExceededError, Capabilities, FatalError, LLMError

__all__ = [
    "error_fields",
    "judge",
    "judge_configs",
    "outcome_fields",
    "resolve_scoring_rule",
    "score",
    "stop_reason",
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


def judge_configs(cfg: GradeConfig, rule: ScoringRule) -> list[GenerateConfig]:
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


def score(
    results: Sequence[GenerateResult], cfg: GradeConfig, rule: ScoringRule, secrets: list[str]
) -> tuple[Outcome, dict[str, Any]]:
    """The outcome and the raw fields of a row, from the replies to `judge_configs`' requests."""
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


async def judge(
    client: LLMClient, prompt: str, cfg: GradeConfig, rule: ScoringRule, secrets: list[str]
) -> tuple[Outcome, dict[str, Any], list[GenerateResult]]:
    """Send one pair's requests at once; its outcome, raw fields and the replies."""
    messages = [Message(role="user", content=prompt)]
    gens = judge_configs(cfg, rule)
    results = list(await asyncio.gather(*(client.generate(messages, g) for g in gens)))
    outcome, raw = score(results, cfg, rule, secrets)
    return outcome, raw, results


def outcome_fields(
    outcome: Outcome, raw: dict[str, Any], results: Sequence[GenerateResult]
) -> dict[str, Any]:
    """The row fields of a judged pair (beyond the pair's own): score, reason, raw replies, usage."""
    costs = [r.usage.cost_usd for r in results]
    return {
        "score": None if outcome.score is None else round(outcome.score, 6),
        "unscored_reason": outcome.reason,
        "numeric_mass": None if outcome.numeric_mass is None else round(outcome.numeric_mass, 6),
        **raw,
        "input_tokens": sum(r.usage.input_tokens for r in results),
        "output_tokens": sum(r.usage.output_tokens for r in results),
        "cost_usd": None if any(c is None for c in costs) else round(sum(c or 0.0 for c in costs), 8),
        "cached": all(r.cached for r in results),
    }


def error_fields(error: LLMError, secrets: list[str]) -> dict[str, Any]:
    """The row fields of a pair whose judge call failed (graded again by a rerun with retry_provider_errors)."""
    text = scrub(f"{type(error).__name__}: {error}", secrets)[:2000]
    return {"score": None, "unscored_reason": "provider_error", "error": text}


def stop_reason(error: LLMError, secrets: list[str]) -> str | None:
    """Why `error` stops the whole run (a budget, a fatal provider error); None when only its pair failed."""
    if isinstance(error, BudgetExceededError):
        return f"budget: {error}"
    if isinstance(error, FatalError):
        return f"fatal provider error: {scrub(str(error), secrets)}"
    return None
