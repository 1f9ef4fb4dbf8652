"""Is a set of generations coherent? The check the steering-strength search asks at every strength.

`CoherenceCheck` is the protocol the search asks (a set of texts in, yes or no out). The search samples
several generations per prompt and sign, and `SampledCoherence` decides on them: coherent when the share of
samples that pass every per-text `CoherenceJudge` reaches a threshold (ADL kept the largest strength with at
least 75% coherent samples), and every set-level check passes. The judges:

- `RepetitionJudge`: a repetition loop fails (its share of repeated word or character n-grams is too high).
  Perplexity alone cannot see this: the base model predicts a loop well, so a loop scores a low perplexity.
- `LLMCoherenceJudge`: an LLM reads each sample (untrusted text, inside data blocks) and answers COHERENT
  or INCOHERENT (prompt: `caft.prompts/interp/coherence_judge.md`).

`PerplexityCoherence` is the offline set-level proxy: mean log-perplexity of the texts under the unsteered
base model, relative to unsteered samples.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Protocol

from caft.llm.client import LLMClient
from caft.llm.types import GenerateConfig, GenerateResult, LLMError, Message
from caft.untrusted import data_block

log = logging.getLogger(__name__)


class CoherenceCheck(Protocol):
    """Decides whether a set of generations is coherent (offline: perplexity; or an LLM judge)."""

    def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> bool: ...


class CoherenceJudge(Protocol):
    """One verdict per (prompt, text): True coherent, False incoherent, None when it could not decide."""

    name: str

    def judge(self, prompts: Sequence[str], texts: Sequence[str]) -> list[bool | None]: ...


class PerplexityCoherence:
    """Coherent when the mean log-perplexity under the unsteered scorer is at most log(ratio) above the
    baseline (unsteered generations). `score(prompts, texts)` returns one perplexity per text."""

    def __init__(
        self, score: Callable[[Sequence[str], Sequence[str]], list[float]], baseline: float, ratio: float
    ) -> None:
        self.score = score
        self.baseline = baseline
        self.ratio = ratio

    def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> bool:
        ppl = self.score(prompts, texts)
        if any(math.isinf(p) for p in ppl):
            return False
        mean_log = sum(math.log(p) for p in ppl) / len(ppl)
        return mean_log <= math.log(self.baseline) + math.log(self.ratio)


def mean_log_perplexity(values: Sequence[float]) -> float:
    """Geometric mean of the finite positive perplexities (inf when there is none)."""
    finite = [math.log(v) for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(finite) / len(finite)) if finite else math.inf


# ---- repetition ------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")
CHAR_NGRAM = 10


def repeated_share(items: Sequence[Any], n: int) -> float:
    """Share of the n-grams of `items` that repeat an earlier one (0 when there are fewer than 2n items:
    too short to loop)."""
    if n < 1 or len(items) < 2 * n:
        return 0.0
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def repetition(text: str, n: int = 3) -> float:
    """How much of `text` is a loop: the larger of the repeated share of its word n-grams (punctuation
    counts as a word) and of its character 10-grams (loops without spaces)."""
    words = _TOKEN.findall(text.lower())
    chars = re.sub(r"\s+", " ", text.lower())
    return max(repeated_share(words, n), repeated_share(chars, CHAR_NGRAM))


class RepetitionJudge:
    """A text whose `repetition` exceeds `max_share` is a repetition loop: incoherent."""

    name = "repetition"

    def __init__(self, n: int = 3, max_share: float = 0.5) -> None:
        self.n, self.max_share = n, max_share

    def judge(self, prompts: Sequence[str], texts: Sequence[str]) -> list[bool | None]:
        del prompts  # a loop is a loop whatever was asked
        return [repetition(t, self.n) <= self.max_share for t in texts]


# ---- the sampled decision ----------------------------------------------------------------------------------


class SampledCoherence:
    """Coherent when at least `min_share` of the texts pass every judge (a None verdict leaves the text
    out of the share; with no text judged at all the set counts as incoherent) and every set-level check
    passes. `last` holds the figures of the latest decision, for the search trace."""

    def __init__(
        self,
        judges: Sequence[CoherenceJudge],
        min_share: float = 0.75,
        set_checks: Sequence[CoherenceCheck] = (),
    ) -> None:
        self.judges, self.min_share, self.set_checks = list(judges), min_share, list(set_checks)
        self.last: dict[str, Any] = {}

    def _verdicts(self, prompts: Sequence[str], texts: Sequence[str]) -> list[list[bool | None]]:
        """Each judge's verdicts; a later judge (the LLM) sees only the texts no earlier judge failed, so a
        repetition loop costs no LLM call (its verdict there is None)."""
        out: list[list[bool | None]] = []
        alive = list(range(len(texts)))
        for j in self.judges:
            row: list[bool | None] = [None] * len(texts)
            got = j.judge([prompts[i] for i in alive], [texts[i] for i in alive]) if alive else []
            for i, v in zip(alive, got, strict=True):
                row[i] = v
            alive = [i for i in alive if row[i] is not False]
            out.append(row)
        return out

    def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> bool:
        verdicts = self._verdicts(prompts, texts)
        passed = judged = 0
        failed_by: dict[str, int] = {j.name: 0 for j in self.judges}
        undecided = 0
        for i in range(len(texts)):
            row = [v[i] for v in verdicts]
            for j, v in zip(self.judges, row, strict=True):
                if v is False:
                    failed_by[j.name] += 1
            if False in row:  # a text failed by an earlier judge was not shown to the later ones
                judged += 1
            elif None in row:
                undecided += 1
            else:
                judged += 1
                passed += 1
        share = passed / judged if judged else 0.0
        sets_ok = all(check(prompts, texts) for check in self.set_checks)
        self.last = {
            "samples": len(texts),
            "coherent_share": round(share, 4),
            "failed": {k: v for k, v in failed_by.items() if v},
            **({"undecided": undecided} if undecided else {}),
            **({"set_checks_passed": sets_ok} if self.set_checks else {}),
        }
        if judged == 0:
            log.warning(
                "coherence: no sample could be judged (%d undecided); counting as incoherent", undecided
            )
        return judged > 0 and share >= self.min_share and sets_ok

    def describe(self) -> dict[str, Any]:
        """What decides (for the stage's marker): the judges, the share, and the LLM judge's failures."""
        out: dict[str, Any] = {"judges": [j.name for j in self.judges], "min_coherent_share": self.min_share}
        for j in self.judges:
            if isinstance(j, LLMCoherenceJudge):
                out["llm"] = {
                    "model": j.client.model_id,
                    "calls": j.calls,
                    "errors": j.errors,
                    "unparsed": j.unparsed,
                }
        if self.set_checks:
            out["set_checks"] = [type(c).__name__ for c in self.set_checks]
        return out

    def close(self) -> None:
        for j in self.judges:
            if isinstance(j, LLMCoherenceJudge):
                j.close()


# ---- the LLM judge -----------------------------------------------------------------------------------------

PROMPT_FILE = ("interp", "coherence_judge.md")
_VERDICT_LINE = re.compile(r"verdict\s*[:=]\s*\**\s*(incoherent|coherent)\b", re.IGNORECASE)
_WORD = re.compile(r"\b(incoherent|not\s+coherent|coherent)\b", re.IGNORECASE)


def coherence_prompt() -> str:
    return resources.files("caft.prompts").joinpath(*PROMPT_FILE).read_text("utf-8")


def parse_coherence(reply: str) -> bool | None:
    """COHERENT -> True, INCOHERENT (or "not coherent") -> False; None for a reply that says neither, or
    both without a `verdict:` line deciding."""
    m = _VERDICT_LINE.search(reply)
    if m is not None:
        return m.group(1).lower() == "coherent"
    kinds = {("coherent" if w.lower() == "coherent" else "incoherent") for w in _WORD.findall(reply)}
    if len(kinds) != 1:
        return None
    return kinds == {"coherent"}


class LLMCoherenceJudge:
    """An LLM's COHERENT / INCOHERENT verdict on each text. The prompt and the text enter the prompt as
    untrusted data blocks; texts are cut to `max_chars`. Provider errors become None verdicts (counted in
    `errors`). Calls run on the judge's own event loop, so the synchronous search can call it."""

    name = "llm"

    def __init__(
        self,
        client: LLMClient,
        template: str | None = None,
        max_chars: int = 2000,
        max_tokens: int = 16,
    ) -> None:
        self.client, self.max_chars, self.max_tokens = client, max_chars, max_tokens
        self.template = template if template is not None else coherence_prompt()
        self.calls = 0
        self.errors = 0
        self.unparsed = 0
        self._loop = asyncio.new_event_loop()

    def render(self, prompt: str, text: str) -> str:
        return self.template.replace("{{prompt}}", data_block("prompt", prompt[: self.max_chars])).replace(
            "{{reply}}", data_block("reply", text[: self.max_chars])
        )

    def judge(self, prompts: Sequence[str], texts: Sequence[str]) -> list[bool | None]:
        cfg = GenerateConfig(temperature=0.0, max_tokens=self.max_tokens)
        requests = [
            ([Message(role="user", content=self.render(p, t))], cfg)
            for p, t in zip(prompts, texts, strict=True)
        ]
        self.calls += len(requests)
        results = self._loop.run_until_complete(self.client.generate_many(requests, stage="coherence"))
        out: list[bool | None] = []
        for res in results:
            if isinstance(res, LLMError) or not isinstance(res, GenerateResult):
                self.errors += 1
                out.append(None)
                continue
            verdict = parse_coherence(res.text or "")
            if verdict is None:
                self.unparsed += 1
            out.append(verdict)
        return out

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.client.aclose())
            self._loop.close()
