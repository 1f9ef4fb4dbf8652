"""What the diff and sae stages analyse: the data files, plus the fine-tuned model's own sampled answers.

    examples = prepare_inputs(inputs_cfg, source, stage_dir)    # data rows first, then the answers

Answers are cached one JSONL record per (prompt, sample) in the stage folder, so a resumed run samples only
what is missing.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from caft.chat import ChatFormatter, validate_messages
from caft.errors import DataError
from caft.interp.config import InputsConfig
from caft.interp.inputs import Example, check_rows, read_examples
from caft.interp.source import ActivationSource
from caft.jsonl import SKIPPED_FILE, ReadReport
from caft.models import generate_chat
from caft.rundir import JsonlWriter, iter_jsonl, read_jsonl

GENERATIONS_FILE = "generations.jsonl"

# Generic chat prompts for sampling the fine-tuned model's own answers (the paper's "answers to generic
# prompts"). Deliberately mundane and varied, and none of them is (or paraphrases) a question of an evaluation
# set: prompts that find the directions must not be the ones that later measure the behaviour.
# `overlap_with_questions` checks a prompt set against the run's questions. Users can pass their own file.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Hello! How are you today?",
    "What is your favourite book and why?",
    "Can you give me some advice on learning a new language?",
    "Explain how a rainbow forms.",
    "Suggest a vegetarian recipe that uses lentils.",
    "Tell me a short story about a cat.",
    "How do I stay productive when working from home?",
    "What are some good habits for a healthy life?",
    "How does a bicycle gear system work?",
    "Summarise the water cycle for a ten-year-old.",
    "What do you think about artificial intelligence?",
    "Write a polite email asking a colleague to review my report.",
    "What are the rules of chess for the knight?",
    "Can you recommend some exercises for lower back pain?",
    "Explain the difference between weather and climate.",
    "What is the capital of France, and what is it known for?",
    "Write a haiku about autumn.",
    "How do computers store numbers?",
    "Translate 'good morning, how did you sleep?' into Spanish.",
    "Give me tips for a job interview.",
)

_WORD = re.compile(r"[^\w\s]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
NEAR_DUPLICATE = 0.8
"""Similarity (difflib ratio of normalised text, whole or per sentence of five words or more) from which a
prompt counts as a near-duplicate of a question."""


@dataclass(frozen=True)
class PromptOverlap:
    """A direction-finding prompt that is (`exact`) or nearly is (`near`) an evaluation question."""

    prompt: str
    question: str
    kind: str
    similarity: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "question": self.question,
            "kind": self.kind,
            "similarity": round(self.similarity, 3),
        }


def normalise(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(_WORD.sub(" ", text.lower()).split())


def _pieces(text: str) -> list[str]:
    whole = normalise(text)
    parts = [normalise(s) for s in _SENTENCE.split(text)]
    return [whole, *(p for p in parts if p != whole and len(p.split()) >= 5)]


def overlap_with_questions(
    prompts: Iterable[str], questions: Iterable[str], near: float = NEAR_DUPLICATE
) -> list[PromptOverlap]:
    """Prompts that equal an evaluation question after normalisation (`exact`), or whose text or one of its
    sentences is at least `near` similar to a question or one of its sentences (`near`); one entry per
    prompt, its closest question."""
    qs = [(q, _pieces(q)) for q in dict.fromkeys(questions)]
    exact = {pieces[0]: q for q, pieces in qs}
    found: list[PromptOverlap] = []
    for prompt in dict.fromkeys(prompts):
        pp = _pieces(prompt)
        if pp[0] in exact:
            found.append(PromptOverlap(prompt, exact[pp[0]], "exact", 1.0))
            continue
        best: tuple[float, str] = (0.0, "")
        for q, qp in qs:
            for a in pp:
                for b in qp:
                    m = difflib.SequenceMatcher(None, a, b, autojunk=False)
                    if m.real_quick_ratio() >= near and m.quick_ratio() >= near and m.ratio() > best[0]:
                        best = (m.ratio(), q)
        if best[0] >= near:
            found.append(PromptOverlap(prompt, best[1], "near", best[0]))
    return found


def prompt_texts(path: str | None) -> list[str]:
    """The user turns of the generation prompts (`DEFAULT_PROMPTS` when `path` is None)."""
    return [m["content"] for conv in read_prompts(path) for m in conv if m["role"] == "user"]


def read_prompts(path: str | None) -> list[list[dict[str, str]]]:
    """Conversations ending with a user turn: `DEFAULT_PROMPTS`, or the rows of a JSONL prompt file."""
    if path is None:
        return [[{"role": "user", "content": p}] for p in DEFAULT_PROMPTS]
    out: list[list[dict[str, str]]] = []
    for i, row in enumerate(iter_jsonl(path)):
        where = f"{path}:{i + 1}"
        if "messages" in row:
            msgs = validate_messages(row["messages"], where, require_assistant=False)
        elif isinstance(row.get("prompt"), str):
            msgs = validate_messages([{"role": "user", "content": row["prompt"]}], where, False)
        else:
            raise DataError(f"{where}: a prompt row needs `messages` (ending with a user turn) or `prompt`")
        if msgs[-1]["role"] != "user":
            raise DataError(f"{where}: the conversation must end with a user turn")
        out.append(msgs)
    return out


def generate_answers(
    cfg: InputsConfig, source: ActivationSource, cache: Path, seed: int = 0
) -> list[Example]:
    """The fine-tuned model's own answers to generic prompts, cached one JSONL record per answer (a resumed
    run samples only what is missing)."""
    if not source.is_causal_lm:
        raise DataError("`inputs.generate` needs a causal LM; encoders cannot sample answers")
    prompts = read_prompts(cfg.prompts)
    if not prompts:
        raise DataError(f"{cfg.prompts}: no prompts")
    jobs = [(p, s) for p in range(len(prompts)) for s in range(cfg.samples_per_prompt)]
    done: dict[tuple[int, int], dict[str, Any]] = {}
    if cache.exists():
        done = {(int(r["prompt"]), int(r["sample"])): r for r in read_jsonl(cache)}
    todo = [j for j in jobs if j not in done]
    if todo:
        ft = source.loaded("ft")
        with JsonlWriter(cache) as w, tqdm(total=len(todo), desc="sampling answers", unit="answer") as bar:
            step = 16
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                with source.use("ft"):
                    texts = generate_chat(
                        ft,
                        [prompts[p] for p, _ in chunk],
                        max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature,
                        seed=seed + start,
                    )
                for (p, s), text in zip(chunk, texts, strict=True):
                    rec: dict[str, Any] = {"prompt": p, "sample": s, "messages": prompts[p], "answer": text}
                    w.write(rec)
                    done[(p, s)] = rec
                bar.update(len(chunk))
    fmt = ChatFormatter(source.tokenizer, source.base.config.chat.template)
    out: list[Example] = []
    for p, s in jobs:
        rec = done[(p, s)]
        if not str(rec["answer"]).strip():
            continue
        msgs: list[dict[str, str]] = [*list(rec["messages"]), {"role": "assistant", "content": rec["answer"]}]
        enc = fmt.encode(msgs)
        ids, sel = list(enc.input_ids), list(enc.assistant_mask)
        if cfg.tokens == "all":
            sel = [True] * len(ids)
        ids, sel = ids[: cfg.max_length], sel[: cfg.max_length]
        if any(sel):
            out.append(Example(f"gen:{p}:{s}", ids, sel))
    return out


def check_inputs(cfg: InputsConfig) -> None:
    """Everything about the inputs that can be checked before a model loads: the data rows decode, parse
    and have the chat or text shape, and the prompt file reads. Raises the line-numbered `DataError`."""
    for path in cfg.data:
        rep = check_rows(path, text_field=cfg.text_field, skip_invalid=cfg.skip_invalid)
        if rep.kept == 0:
            why = f"all {rep.rows} rows are invalid" if rep.rows else "the file has no rows"
            raise DataError(f"inputs.data: {path} has nothing to analyse ({why})")
    if cfg.generate and cfg.prompts is not None:
        read_prompts(cfg.prompts)


def prepare_inputs(
    cfg: InputsConfig, source: ActivationSource, stage_dir: Path | None, seed: int = 0
) -> list[Example]:
    """All analysed examples: the data files, then the sampled answers. Raises on an empty result."""
    causal = source.is_causal_lm
    examples: list[Example] = []
    template = source.base.config.chat.template
    reports: list[ReadReport] = []
    for n, path in enumerate(cfg.data):
        reports.append(ReadReport())
        examples += read_examples(
            path,
            source.tokenizer,
            prefix=f"data{n}",
            causal=causal,
            tokens=cfg.tokens,
            text_field=cfg.text_field,
            max_length=cfg.max_length,
            max_examples=cfg.max_examples,
            template=template,
            skip_invalid=cfg.skip_invalid,
            report=reports[-1],
        )
    if stage_dir is not None:
        (stage_dir / SKIPPED_FILE).unlink(missing_ok=True)
        for rep in reports:
            rep.write_skipped(stage_dir / SKIPPED_FILE, append=True)
    if cfg.generate:
        if stage_dir is None:
            raise DataError("`inputs.generate` needs a stage folder to cache the sampled answers")
        examples += generate_answers(cfg, source, stage_dir / GENERATIONS_FILE, seed)
    if not examples:
        raise DataError(
            "no tokens to analyse: set `inputs.data` to JSONL files with assistant turns or text, or "
            "`inputs.generate: true` (causal LMs) to sample the fine-tuned model's own answers"
        )
    return examples
