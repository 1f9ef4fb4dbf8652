"""The judge prompt templates of one grading run, by metric, with per-question overrides."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from caft.errors import DataError
from caft.evals.inputs import AnswerRow
from caft.evals.questions import check_template, prompt_hash


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

    def hashes(self, rows: Iterable[AnswerRow], metrics: Sequence[str]) -> dict[str, set[str]]:
        """Per metric, the hashes of every template these rows will be judged with."""
        out: dict[str, set[str]] = {m: set() for m in metrics}
        for qid in {r.question_id for r in rows}:
            for m in metrics:
                out[m].add(prompt_hash(self.template(qid, m)))
        return out
