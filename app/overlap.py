"""Direction-finding prompts against the run's evaluation questions: a run whose diff, SAE or steering prompts are
(nearly) its misalignment eval questions partly measures its own selection set, so each such stage warns and
records the overlap in its marker and the run summary."""

from __future__ import annotations

import logging
from typing import Any

from caft.app.run_config import RunConfig

log = logging.getLogger(__name__)


def prompt_overlap(cfg: RunConfig, prompts: str | list[str] | None, stage: str) -> dict[str, Any]:
    """`{"prompt_overlap": ...}`: which of a stage's direction-finding prompts (a prompt file, a list, or the
    built-in generic prompts for None) are or nearly are questions of the run's misalignment eval; warns
    when any is. Empty when the run has no question eval."""
    if cfg.task_kind != "chat" or not cfg.eval.misalignment:
        return {}
    from caft.evals.questions import load_questions
    from caft.interp.answers import overlap_with_questions, prompt_texts

    texts = prompts if isinstance(prompts, list) else prompt_texts(prompts)
    questions = [p for q in load_questions(cfg.eval.questions) for p in q.paraphrases]
    found = overlap_with_questions(texts, questions)
    if found:
        log.warning(
            "%s stage: %d of %d prompts used to find directions are evaluation questions (%s), so the eval "
            "partly measures the selection set: set %s to other prompts",
            stage,
            len(found),
            len(texts),
            "; ".join(f"{o.prompt!r} ~ {o.question!r}" for o in found[:3]),
            {"diff": "diff.inputs.prompts", "sae": "sae.inputs.prompts"}.get(
                stage, "evidence.steering.prompts"
            ),
        )
    source = prompts if isinstance(prompts, str) else ("builtin" if prompts is None else "config")
    return {
        "prompt_overlap": {
            "prompts": source,
            "questions": cfg.eval.questions or "builtin",
            "n_prompts": len(texts),
            "overlapping": [o.as_dict() for o in found],
        }
    }
