"""The dry run of grading (`caft grade --dry-run`): what the run would send and cost, and what the judge can
do, without sending anything."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caft.evals.config import GradeConfig
from caft.evals.grade_judge import resolve_scoring_rule
from caft.evals.grade_state import pending_pairs
from caft.evals.inputs import AnswerRow
from caft.evals.prompt_book import PromptBook
from caft.evals.questions import render_judge_prompt
from caft.llm.types import Capabilities

__all__ = ["estimate", "judge_capabilities"]


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
