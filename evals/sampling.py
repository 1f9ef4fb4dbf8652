"""Sampling answers to free-form questions from the model under test, streamed to `answers.jsonl`.

Every answer has a deterministic id `<question_id>/<paraphrase>/<sample>`; a rerun reads the file and
generates only the ids that are missing, so an interrupted sampling run resumes where it stopped.

Seeds. The transformers backend seeds torch once per batch (the rows of a batch draw distinct samples from
one generator), the seed deriving from the base seed and the batch's first answer id. vLLM's seed is a
per-request generator seed: identical prompts with one shared seed give identical answers, so the vLLM
backend gets one seed per answer, `answer_seed(base, answer id)`, in one SamplingParams per request. Either
way a fresh run is reproducible, and for vLLM a resumed run draws exactly the answers a fresh one would.

The conversation includes the question's `system` prompt when it has one (the EM reference code drops it).

Backends: `transformers` (caft.models.load_model + generate_chat, any hooks on the model apply, e.g. a
test-time ablation) and `vllm` (imported only when chosen; LoRA adapters through vLLM's LoRA support).
`auto` picks vLLM when it is installed and a GPU is present.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from caft.errors import ConfigError, DataError
from caft.evals.questions import Question
from caft.rundir import JsonlWriter, iter_jsonl

if TYPE_CHECKING:
    from caft.chat import ChatFormatter
    from caft.config import ModelConfig
    from caft.evals.config import SampleConfig
    from caft.models import LoadedModel

log = logging.getLogger(__name__)

ANSWERS_FILE = "answers.jsonl"


class ChatGenerator(Protocol):
    """Anything that turns conversations into one sampled reply each."""

    name: str

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[str]: ...


@dataclass(frozen=True)
class SampleItem:
    id: str
    question: Question
    paraphrase_index: int
    sample_index: int

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.question.messages(self.paraphrase_index)


def plan(questions: Sequence[Question], samples_per_paraphrase: int | None = None) -> list[SampleItem]:
    """Every answer to produce, in file order."""
    items: list[SampleItem] = []
    for q in questions:
        n = samples_per_paraphrase or q.samples_per_paraphrase
        for p in range(len(q.paraphrases)):
            items.extend(SampleItem(f"{q.id}/{p}/{s}", q, p, s) for s in range(n))
    return items


def _batch_seed(base: int, key: str) -> int:
    digest = hashlib.sha256(f"{base}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def answer_seed(base: int, answer_id: str) -> int:
    """The seed of one answer (backends with per-request seeds): same derivation as the batch seeds."""
    return _batch_seed(base, answer_id)


@dataclass(frozen=True)
class SampleParams:
    """The sampling settings of one answer."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int


@runtime_checkable
class SeededChatGenerator(Protocol):
    """A backend that takes one seed per conversation (vLLM). `chunk_size` answers are generated per call
    and written before the next call, so an interruption loses at most one chunk."""

    name: str
    chunk_size: int

    def generate_seeded(
        self, conversations: list[list[dict[str, str]]], params: Sequence[SampleParams]
    ) -> list[str]: ...


def done_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {str(r["id"]) for r in iter_jsonl(path) if "id" in r}


class TransformersGenerator:
    """Batched generation with the model's chat template (caft.models.generate_chat)."""

    name = "transformers"

    def __init__(self, loaded: LoadedModel, batch_size: int = 16) -> None:
        self.loaded = loaded
        self.batch_size = batch_size

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[str]:
        from caft.models import generate_chat

        return generate_chat(
            self.loaded,
            conversations,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=self.batch_size,
        )


class VLLMEngine(Protocol):
    """The part of `vllm.LLM` used here."""

    def generate(self, prompts: Any, sampling_params: Any = None, **kwargs: Any) -> Any: ...

    def get_tokenizer(self) -> Any: ...


class VLLMGenerator:
    """vLLM offline engine, one SamplingParams (and seed) per answer; a peft adapter is served as a LoRA
    adapter (no merge). `engine`, `sampling_params` and `lora_request` default to vLLM's own classes; tests
    pass stand-ins with the same call shape."""

    name = "vllm"

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        max_lora_rank: int = 64,
        chunk_size: int = 512,
        engine: VLLMEngine | None = None,
        sampling_params: Callable[..., Any] | None = None,
        lora_request: Callable[[str, int, str], Any] | None = None,
    ) -> None:
        if engine is None or sampling_params is None or (cfg.adapter and lora_request is None):
            import vllm
            from vllm.lora.request import LoRARequest

            sampling_params = sampling_params or vllm.SamplingParams
            lora_request = lora_request or LoRARequest
            if engine is None:
                kwargs: dict[str, Any] = {
                    "model": cfg.name_or_path,
                    "dtype": "auto" if cfg.dtype == "auto" else cfg.dtype,
                    "trust_remote_code": cfg.trust_remote_code,
                    "revision": cfg.revision,
                }
                if cfg.adapter:
                    kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
                engine = vllm.LLM(**kwargs)
        self.engine = engine
        self.chunk_size = chunk_size
        self._params = sampling_params
        self.lora = lora_request("caft-adapter", 1, cfg.adapter) if cfg.adapter and lora_request else None
        self.template = cfg.chat.template
        self._formatter: ChatFormatter | None = None

    def _prompt(self, conversation: list[dict[str, str]]) -> dict[str, list[int]]:
        """Token ids rendered as the transformers backend renders them (same template choice, no second
        BOS: a text prompt would be tokenized again with special tokens)."""
        if self._formatter is None:
            from caft.chat import ChatFormatter

            self._formatter = ChatFormatter(self.engine.get_tokenizer(), self.template)
        return {"prompt_token_ids": self._formatter.prompt_ids(conversation)}

    def generate_seeded(
        self, conversations: list[list[dict[str, str]]], params: Sequence[SampleParams]
    ) -> list[str]:
        sampling = [
            self._params(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_new_tokens, seed=p.seed)
            for p in params
        ]
        prompts = [self._prompt(c) for c in conversations]
        outs = self.engine.generate(prompts, sampling, lora_request=self.lora, use_tqdm=False)
        return [str(o.outputs[0].text) for o in outs]

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[str]:
        """The batch interface: each conversation still gets its own seed (derived from `seed`)."""
        params = [
            SampleParams(max_new_tokens, temperature, top_p, answer_seed(seed, str(i)))
            for i in range(len(conversations))
        ]
        return self.generate_seeded(conversations, params)


def vllm_usable() -> bool:
    """vLLM is installed and a CUDA device is visible."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def make_generator(model: ModelConfig, cfg: SampleConfig) -> ChatGenerator:
    """The backend `cfg.backend` asks for (`auto`: vLLM when usable, else transformers)."""
    backend = cfg.backend
    if backend == "auto":
        backend = "vllm" if vllm_usable() else "transformers"
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "sample.backend=vllm but vLLM is not installed: pip install vllm, or use transformers"
            )
        return VLLMGenerator(model, chunk_size=max(cfg.batch_size, 512))
    from caft.models import load_model

    return TransformersGenerator(load_model(model, padding_side="left"), batch_size=cfg.batch_size)


@dataclass
class SampleReport:
    out_path: Path
    planned: int
    already_done: int
    generated: int


def _todo(
    questions: Sequence[Question], out: Path, cfg: SampleConfig
) -> tuple[list[SampleItem], list[SampleItem]]:
    """(every planned answer, the ones not yet in `out`)."""
    items = plan(questions, cfg.samples_per_paraphrase)
    have = done_ids(out)
    return items, [it for it in items if it.id not in have]


def missing_answers(questions: Sequence[Question], out_path: str | Path, cfg: SampleConfig) -> int:
    """How many answers `sample_answers` would still generate into `out_path` (reads no model)."""
    return len(_todo(questions, Path(out_path), cfg)[1])


def sample_answers(
    generator: ChatGenerator,
    questions: Sequence[Question],
    out_path: str | Path,
    cfg: SampleConfig,
    model_id: str = "",
    on_batch: Callable[[int], None] | None = None,
) -> SampleReport:
    """Generate every missing answer of `questions` into `out_path` (JSONL, one answer per line)."""
    out = Path(out_path)
    items, todo = _todo(questions, out, cfg)
    if not items:
        raise DataError("no questions to sample (the question file is empty)")
    report = SampleReport(out, planned=len(items), already_done=len(items) - len(todo), generated=0)
    if not todo:
        return report
    with JsonlWriter(out) as writer:
        if isinstance(generator, SeededChatGenerator):
            _sample_seeded(generator, todo, cfg, writer, model_id, report, on_batch)
            return report
        groups: dict[tuple[str, int], list[SampleItem]] = {}
        for it in todo:
            groups.setdefault((it.question.id, it.paraphrase_index), []).append(it)
        for (qid, p), group in groups.items():
            temperature, top_p, max_new = _settings(group[0].question, cfg)
            for start in range(0, len(group), cfg.batch_size):
                chunk = group[start : start + cfg.batch_size]
                seed = _batch_seed(cfg.seed, f"{qid}/{p}/{chunk[0].sample_index}")
                texts = generator.generate([c.messages for c in chunk], max_new, temperature, top_p, seed)
                if len(texts) != len(chunk):
                    raise RuntimeError(f"generator returned {len(texts)} replies for {len(chunk)} prompts")
                params = SampleParams(max_new, temperature, top_p, seed)
                for it, text in zip(chunk, texts, strict=True):
                    writer.write(_record(it, text, params, model_id, generator.name))
                report.generated += len(chunk)
                if on_batch is not None:
                    on_batch(len(chunk))
    return report


def _settings(q: Question, cfg: SampleConfig) -> tuple[float, float, int]:
    """(temperature, top_p, max_new_tokens): the question's own when it sets them, else the config's."""
    temperature = q.temperature if q.temperature is not None else cfg.temperature
    top_p = q.top_p if q.top_p is not None else cfg.top_p
    max_new = q.max_tokens if q.max_tokens is not None else cfg.max_new_tokens
    return temperature, top_p, max_new


def _record(it: SampleItem, text: str, params: SampleParams, model_id: str, backend: str) -> dict[str, Any]:
    q = it.question
    return {
        "id": it.id,
        "question_id": q.id,
        "paraphrase_index": it.paraphrase_index,
        "sample_index": it.sample_index,
        "system": q.system,
        "question": q.paraphrases[it.paraphrase_index],
        "answer": text,
        "model": model_id,
        "backend": backend,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_new_tokens": params.max_new_tokens,
        "seed": params.seed,
    }


def _sample_seeded(
    generator: SeededChatGenerator,
    todo: list[SampleItem],
    cfg: SampleConfig,
    writer: JsonlWriter,
    model_id: str,
    report: SampleReport,
    on_batch: Callable[[int], None] | None,
) -> None:
    """One seed per answer; chunks mix questions (the engine batches them itself)."""
    size = max(1, generator.chunk_size)
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        params = []
        for it in chunk:
            temperature, top_p, max_new = _settings(it.question, cfg)
            params.append(SampleParams(max_new, temperature, top_p, answer_seed(cfg.seed, it.id)))
        texts = generator.generate_seeded([it.messages for it in chunk], params)
        if len(texts) != len(chunk):
            raise RuntimeError(f"generator returned {len(texts)} replies for {len(chunk)} prompts")
        for it, text, p in zip(chunk, texts, params, strict=True):
            writer.write(_record(it, text, p, model_id, generator.name))
        report.generated += len(chunk)
        if on_batch is not None:
            on_batch(len(chunk))
