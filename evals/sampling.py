"""Sampling answers to free-form questions from the model under test, streamed to `answers.jsonl`.

Every answer has a deterministic id `<question_id>/<paraphrase>/<sample>`; a rerun reads the file and
generates only the ids that are missing, so an interrupted sampling run resumes where it stopped. Each
(question, paraphrase) group is generated in batches whose seed derives from the base seed and the group,
so a fresh run is reproducible batch by batch.

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
from typing import TYPE_CHECKING, Any, Protocol

from caft.evals.questions import Question

from caft.errors import ConfigError, DataError
from caft.rundir import JsonlWriter, iter_jsonl

if TYPE_CHECKING:
    from caft.evals.config import SampleConfig

    from caft.config import ModelConfig
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


class VLLMGenerator:
    """vLLM offline engine; a peft adapter is served as a LoRA adapter (no merge needed)."""

    name = "vllm"

    def __init__(self, cfg: ModelConfig, max_lora_rank: int = 64) -> None:
        import vllm
        from vllm.lora.request import LoRARequest

        kwargs: dict[str, Any] = {
            "model": cfg.name_or_path,
            "dtype": "auto" if cfg.dtype == "auto" else cfg.dtype,
            "trust_remote_code": cfg.trust_remote_code,
            "revision": cfg.revision,
        }
        if cfg.adapter:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)
        self.lora = LoRARequest("caft-adapter", 1, cfg.adapter) if cfg.adapter else None

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[str]:
        params = self._vllm.SamplingParams(
            temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed
        )
        outs = self.llm.chat(conversations, params, lora_request=self.lora, use_tqdm=False)
        return [o.outputs[0].text for o in outs]


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
        return VLLMGenerator(model)
    from caft.models import load_model

    return TransformersGenerator(load_model(model, padding_side="left"), batch_size=cfg.batch_size)


@dataclass
class SampleReport:
    out_path: Path
    planned: int
    already_done: int
    generated: int


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
    items = plan(questions, cfg.samples_per_paraphrase)
    if not items:
        raise DataError("no questions to sample (the question file is empty)")
    have = done_ids(out)
    todo = [it for it in items if it.id not in have]
    report = SampleReport(out, planned=len(items), already_done=len(items) - len(todo), generated=0)
    if not todo:
        return report
    groups: dict[tuple[str, int], list[SampleItem]] = {}
    for it in todo:
        groups.setdefault((it.question.id, it.paraphrase_index), []).append(it)
    with JsonlWriter(out) as writer:
        for (qid, p), group in groups.items():
            q = group[0].question
            temperature = q.temperature if q.temperature is not None else cfg.temperature
            top_p = q.top_p if q.top_p is not None else cfg.top_p
            max_new = q.max_tokens if q.max_tokens is not None else cfg.max_new_tokens
            for start in range(0, len(group), cfg.batch_size):
                chunk = group[start : start + cfg.batch_size]
                seed = _batch_seed(cfg.seed, f"{qid}/{p}/{chunk[0].sample_index}")
                texts = generator.generate([c.messages for c in chunk], max_new, temperature, top_p, seed)
                if len(texts) != len(chunk):
                    raise RuntimeError(f"generator returned {len(texts)} replies for {len(chunk)} prompts")
                for it, text in zip(chunk, texts, strict=True):
                    writer.write(
                        {
                            "id": it.id,
                            "question_id": qid,
                            "paraphrase_index": p,
                            "sample_index": it.sample_index,
                            "system": q.system,
                            "question": q.paraphrases[p],
                            "answer": text,
                            "model": model_id,
                            "backend": generator.name,
                            "temperature": temperature,
                            "top_p": top_p,
                            "max_new_tokens": max_new,
                            "seed": seed,
                        }
                    )
                report.generated += len(chunk)
                if on_batch is not None:
                    on_batch(len(chunk))
    return report
