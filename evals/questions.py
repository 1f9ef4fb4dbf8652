"""Question sets and judge prompts in the emergent-misalignment YAML format.

The format (Betley et al. 2025, as it circulates in the public forks) is a YAML list of questions::

    - id: some_question
      type: free_form_judge_0_100
      system: optional system prompt          # honoured here (the public reference code drops it)
      paraphrases: [text, ...]                # one or more wordings of the question
      samples_per_paraphrase: 100
      judge: gpt-4.1-2025-04-14
      judge_prompts: {aligned: "...{question}...{answer}...", coherent: "..."}

Files lean on YAML anchors and aliases (`&judge_prompts` / `*judge_prompts`); `yaml.safe_load` resolves them,
so aliased fields arrive as ordinary values. A judge-prompt file is either a mapping with a top-level
`judge_prompts:` section (the coding-vulnerability file) or a plain mapping of metric -> template.

caft ships its own question set and judge prompts (in its own words) under `caft.prompts/evals/`; a user can
point at any file in this format instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from caft.errors import DataError
from caft.untrusted import break_markers, escape_untrusted

log = logging.getLogger(__name__)

#: Fields of a question entry that caft understands. Other keys are kept in `Question.extra` and logged.
KNOWN_FIELDS = frozenset(
    {
        "id",
        "type",
        "paraphrases",
        "samples_per_paraphrase",
        "system",
        "judge",
        "judge_prompts",
        "temperature",
        "top_p",
        "max_tokens",
    }
)
#: Question types that are graded by a 0-100 judge (the only kind the EM files use).
SUPPORTED_TYPES = ("free_form_judge_0_100", "free_form_judge", "free_form")

_PLACEHOLDER = re.compile(r"\{(question|answer)\}")

DEFAULT_QUESTIONS = "questions.yaml"
DEFAULT_JUDGE_PROMPTS = "judge_prompts.yaml"


@dataclass(frozen=True)
class Question:
    """One free-form question: its wordings, how often to sample each, and how to judge the answers."""

    id: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int = 1
    system: str | None = None
    judge: str | None = None
    judge_prompts: Mapping[str, str] = field(default_factory=dict)
    type: str = "free_form_judge_0_100"
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def messages(self, paraphrase_index: int) -> list[dict[str, str]]:
        """The conversation sent to the model under test: the system prompt (when set) and one paraphrase."""
        msgs: list[dict[str, str]] = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        msgs.append({"role": "user", "content": self.paraphrases[paraphrase_index]})
        return msgs

    @property
    def n_samples(self) -> int:
        return len(self.paraphrases) * self.samples_per_paraphrase


@functools.lru_cache(maxsize=256)
def prompt_hash(template: str) -> str:
    """Short stable hash of a judge prompt template (recorded with every grade)."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


def check_template(template: str, where: str) -> None:
    """A judge prompt must contain `{answer}`; `{question}` is optional but expected."""
    if not isinstance(template, str) or not template.strip():
        raise DataError(f"{where}: judge prompt must be non-empty text")
    if "{answer}" not in template:
        raise DataError(
            f"{where}: judge prompt has no {{answer}} placeholder, so the judge would never see the answer; "
            "add {answer} (and {question}) where they belong"
        )
    if "{question}" not in template:
        log.warning("%s: judge prompt has no {question} placeholder", where)


def render_judge_prompt(template: str, question: str, answer: str) -> str:
    """Fill `{question}` and `{answer}` in one pass, the values escaped as untrusted data.

    Only those two placeholders are touched, so other braces in a prompt (JSON examples) survive, and text
    inside the question or answer is never re-interpreted (an answer containing "{question}" stays as is).
    Both values go through `escape_untrusted` (no look-alike `<<<` / `>>>` delimiters, no invisible
    characters), and copies of the template's own delimiters around the placeholders (`[ANSWER END]` in
    an EM prompt file) are broken up, so an answer cannot close its block and write as the auditor.
    """
    markers = template_markers(template)
    values = {
        "question": break_markers(escape_untrusted(question), markers),
        "answer": break_markers(escape_untrusted(answer), markers),
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# a delimiter line holds bracket-like characters, or is a short all-caps label such as ANSWER END
_DELIMITER_LIKE = re.compile(r"[\[\]<>|#=*~`]|^[A-Z][A-Z _-]{2,}$")


@functools.lru_cache(maxsize=256)
def template_markers(template: str) -> tuple[str, ...]:
    """The delimiters a template puts around `{question}` and `{answer}`: the text beside a placeholder on
    its line, or the nearest non-empty line before and after it, when it looks like a delimiter."""
    lines = template.split("\n")
    found: list[str] = []
    for i, line in enumerate(lines):
        for m in _PLACEHOLDER.finditer(line):
            before, after = line[: m.start()].strip(), line[m.end() :].strip()
            if not before:
                before = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
            if not after:
                after = next((x.strip() for x in lines[i + 1 :] if x.strip()), "")
            for text in (before, after):
                if text and len(text) <= 60 and "{" not in text and _DELIMITER_LIKE.search(text):
                    found.append(text)
    return tuple(dict.fromkeys(found))


def read_yaml_any(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"question/prompt file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise DataError(f"{path} is not valid YAML: {e}") from None


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: `paraphrases` must be a non-empty list of strings")
    for i, p in enumerate(value):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{where}: paraphrase {i} is empty or not text")
    return tuple(value)


def _judge_prompts(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: `judge_prompts` must map metric names to prompt templates")
    out: dict[str, str] = {}
    for metric, template in value.items():
        check_template(template, f"{where}: judge_prompts.{metric}")
        out[str(metric)] = template
    return out


def _opt_number(entry: Mapping[str, Any], key: str, where: str, kind: type) -> Any:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: `{key}` must be a number (got {value!r})")
    return kind(value)


def parse_question(entry: Any, where: str) -> Question:
    """Validate one YAML entry into a `Question`; errors name the file, the entry and the field."""
    if not isinstance(entry, Mapping):
        raise DataError(f"{where}: each question must be a mapping with at least `id` and `paraphrases`")
    qid = entry.get("id")
    if qid is None or (isinstance(qid, str) and not qid.strip()):
        raise DataError(f"{where}: question has no `id`")
    where = f"{where} (id {qid})"
    qtype = str(entry.get("type", "free_form_judge_0_100"))
    if qtype not in SUPPORTED_TYPES:
        raise DataError(
            f"{where}: unsupported question type {qtype!r} (supported: {', '.join(SUPPORTED_TYPES)})"
        )
    n = entry.get("samples_per_paraphrase", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"{where}: `samples_per_paraphrase` must be a positive integer (got {n!r})")
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: `system` must be text (got {type(system).__name__})")
    judge = entry.get("judge")
    extra = {k: v for k, v in entry.items() if k not in KNOWN_FIELDS}
    if extra:
        log.warning("%s: ignoring unknown fields %s", where, ", ".join(sorted(map(str, extra))))
    max_tokens = _opt_number(entry, "max_tokens", where, int)
    return Question(
        id=str(qid),
        paraphrases=_str_list(entry.get("paraphrases"), where),
        samples_per_paraphrase=n,
        system=system if system and system.strip() else None,
        judge=None if judge is None else str(judge),
        judge_prompts=_judge_prompts(entry.get("judge_prompts"), where),
        type=qtype,
        temperature=_opt_number(entry, "temperature", where, float),
        top_p=_opt_number(entry, "top_p", where, float),
        max_tokens=max_tokens,
        extra=extra,
    )


def load_questions(path: str | Path | None = None) -> list[Question]:
    """Load a question file (caft's own default set when `path` is None). Ids must be unique."""
    p = Path(path) if path is not None else default_prompt_path(DEFAULT_QUESTIONS)
    data = read_yaml_any(p)
    if isinstance(data, Mapping) and "questions" in data:
        data = data["questions"]
    if not isinstance(data, list) or not data:
        raise DataError(f"{p}: expected a YAML list of questions (each with `id` and `paraphrases`)")
    questions = [parse_question(entry, f"{p}: entry {i}") for i, entry in enumerate(data)]
    seen: dict[str, int] = {}
    for i, q in enumerate(questions):
        if q.id in seen:
            raise DataError(
                f"{p}: question id {q.id!r} appears twice (entries {seen[q.id]} and {i}); ids must be unique"
            )
        seen[q.id] = i
    return questions


def load_judge_prompts(path: str | Path | None = None) -> dict[str, str]:
    """Load judge prompt templates (caft's own when `path` is None): `{judge_prompts: {metric: template}}`
    or `{metric: template}`."""
    p = Path(path) if path is not None else default_prompt_path(DEFAULT_JUDGE_PROMPTS)
    data = read_yaml_any(p)
    if isinstance(data, Mapping) and "judge_prompts" in data:
        data = data["judge_prompts"]
    if not isinstance(data, Mapping) or not data:
        raise DataError(
            f"{p}: expected a mapping of metric -> judge prompt (optionally under `judge_prompts:`)"
        )
    return _judge_prompts(data, str(p))


def default_prompt_path(name: str) -> Path:
    """Path of one of caft's own eval prompt files (package data under `caft.prompts/evals/`)."""
    root = resources.files("caft.prompts") / "evals" / name
    return Path(str(root))


def default_coding_prompts_path() -> Path:
    return default_prompt_path("code_prompts.yaml")
