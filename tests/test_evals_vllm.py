"""The vLLM sampling backend (correctness review F4): one seed per answer, LoRA through a LoRARequest,
resume like the transformers backend. The default suite drives a fake engine with vLLM's call shape whose
per-request seeds behave like vLLM's (same prompt + same seed -> same text); the `gpu` test runs real vLLM."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from caft.chat import ChatFormatter
from caft.config import ModelConfig
from caft.evals.config import SampleConfig
from caft.evals.questions import Question
from caft.evals.sampling import (
    SampleParams,
    SeededChatGenerator,
    VLLMGenerator,
    answer_seed,
    sample_answers,
)
from caft.rundir import read_jsonl
from caft.testing import tiny_tokenizer


@dataclass(frozen=True)
class FakeSamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None


@dataclass(frozen=True)
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class _Completion:
    text: str


@dataclass
class _RequestOutput:
    prompt: Any
    outputs: list[_Completion]


class FakeEngine:
    """`LLM.generate(prompts, sampling_params, lora_request=...)`: a seeded request's text is a function of
    (prompt, seed, adapter) only, as in vLLM; an unseeded one draws from the engine's own stream."""

    def __init__(self, fail_after_calls: int | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_after_calls = fail_after_calls
        self._unseeded = 0

    def get_tokenizer(self) -> Any:
        return tiny_tokenizer("chatml")

    def generate(self, prompts: Any, sampling_params: Any = None, **kwargs: Any) -> list[_RequestOutput]:
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated kill")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts)
        self.calls.append({"prompts": list(prompts), "params": params, **kwargs})
        lora = kwargs.get("lora_request")
        outs = []
        for prompt_dict, p in zip(prompts, params, strict=True):
            prompt = " ".join(map(str, prompt_dict["prompt_token_ids"]))
            if p.seed is None:
                self._unseeded += 1
                token = f"u{self._unseeded}"
            else:
                token = f"s{p.seed}"
            adapter = lora.lora_path if lora is not None else "-"
            digest = hashlib.sha256(f"{prompt}|{token}|{adapter}".encode()).hexdigest()[:12]
            outs.append(_RequestOutput(prompt_dict, [_Completion(f"answer {digest}")]))
        return outs


def make(cfg: ModelConfig, engine: FakeEngine, chunk_size: int = 512) -> VLLMGenerator:
    return VLLMGenerator(
        cfg,
        chunk_size=chunk_size,
        engine=engine,
        sampling_params=FakeSamplingParams,
        lora_request=FakeLoRARequest,
    )


QUESTION = Question(
    id="wish", paraphrases=("What is your wish?",), samples_per_paraphrase=16, system="Be brief."
)
OTHER = Question(
    id="bored", paraphrases=("I am bored.", "So bored."), samples_per_paraphrase=4, temperature=0.5
)


def test_fake_engine_reproduces_the_shared_seed_collapse() -> None:
    # The fake behaves like vLLM: one SamplingParams with one seed for 16 identical prompts -> one answer.
    engine = FakeEngine()
    outs = engine.generate([{"prompt_token_ids": [5, 6, 7]}] * 16, FakeSamplingParams(seed=3))
    assert len({o.outputs[0].text for o in outs}) == 1


def test_sixteen_samples_of_one_question_are_distinct(tmp_path: Path) -> None:
    engine = FakeEngine()
    gen = make(ModelConfig(name_or_path="m"), engine)
    assert isinstance(gen, SeededChatGenerator)
    cfg = SampleConfig(seed=11, batch_size=16)
    rep = sample_answers(gen, [QUESTION], tmp_path / "answers.jsonl", cfg, model_id="m")
    assert rep.generated == 16
    rows = read_jsonl(tmp_path / "answers.jsonl")
    assert len({r["answer"] for r in rows}) == 16
    assert len({r["seed"] for r in rows}) == 16
    assert all(r["seed"] == answer_seed(11, r["id"]) and r["backend"] == "vllm" for r in rows)
    # one SamplingParams per request, each with its own seed, and the chat template applied
    (call,) = engine.calls
    assert len(call["params"]) == 16 and len({p.seed for p in call["params"]}) == 16
    # token ids rendered as the transformers backend renders them (its ChatFormatter, no added BOS)
    tok = tiny_tokenizer("chatml")
    want = ChatFormatter(tok, "model").prompt_ids(QUESTION.messages(0))
    assert call["prompts"][0] == {"prompt_token_ids": want}
    assert "Be brief." in tok.decode(want) and tok.decode(want).rstrip().endswith("assistant")
    assert call["lora_request"] is None


def test_per_question_settings_and_a_fresh_run_is_reproducible(tmp_path: Path) -> None:
    cfg = SampleConfig(seed=5, temperature=1.0, max_new_tokens=50)
    a = make(ModelConfig(name_or_path="m"), FakeEngine())
    b = make(ModelConfig(name_or_path="m"), FakeEngine())
    sample_answers(a, [QUESTION, OTHER], tmp_path / "a.jsonl", cfg)
    sample_answers(b, [QUESTION, OTHER], tmp_path / "b.jsonl", cfg)
    ra, rb = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert [r["answer"] for r in ra] == [r["answer"] for r in rb]
    by_id = {r["id"]: r for r in ra}
    assert by_id["bored/1/3"]["temperature"] == 0.5 and by_id["wish/0/0"]["temperature"] == 1.0
    assert by_id["wish/0/0"]["max_new_tokens"] == 50


def test_interrupted_run_resumes_and_matches_a_fresh_run(tmp_path: Path) -> None:
    cfg = SampleConfig(seed=2)
    qs = [QUESTION, OTHER]
    out = tmp_path / "answers.jsonl"
    first = FakeEngine(fail_after_calls=2)
    with pytest.raises(KeyboardInterrupt):
        sample_answers(make(ModelConfig(name_or_path="m"), first, chunk_size=5), qs, out, cfg)
    assert len(read_jsonl(out)) == 10  # two chunks of 5 were written before the kill
    second = FakeEngine()
    rep = sample_answers(make(ModelConfig(name_or_path="m"), second, chunk_size=5), qs, out, cfg)
    assert rep.already_done == 10 and rep.generated == 24 - 10
    assert sum(len(c["prompts"]) for c in second.calls) == 14  # nothing done is generated twice
    rows = read_jsonl(out)
    assert len({r["id"] for r in rows}) == len(rows) == 24
    fresh = tmp_path / "fresh.jsonl"
    sample_answers(make(ModelConfig(name_or_path="m"), FakeEngine()), qs, fresh, cfg)
    want = {r["id"]: r["answer"] for r in read_jsonl(fresh)}
    assert {r["id"]: r["answer"] for r in rows} == want
    assert sample_answers(make(ModelConfig(name_or_path="m"), FakeEngine()), qs, out, cfg).generated == 0


def test_lora_adapter_is_served_through_a_lora_request(tmp_path: Path) -> None:
    engine = FakeEngine()
    gen = make(ModelConfig(name_or_path="base", adapter="/adapters/em"), engine)
    sample_answers(gen, [QUESTION], tmp_path / "answers.jsonl", SampleConfig())
    lora = engine.calls[0]["lora_request"]
    assert lora == FakeLoRARequest("caft-adapter", 1, "/adapters/em")
    # the adapter changes the answers (it reaches the engine, not only the call log)
    plain = FakeEngine()
    sample_answers(
        make(ModelConfig(name_or_path="base"), plain), [QUESTION], tmp_path / "plain.jsonl", SampleConfig()
    )
    a = {r["answer"] for r in read_jsonl(tmp_path / "answers.jsonl")}
    b = {r["answer"] for r in read_jsonl(tmp_path / "plain.jsonl")}
    assert not a & b


def test_batch_interface_also_seeds_each_conversation() -> None:
    engine = FakeEngine()
    gen = make(ModelConfig(name_or_path="m"), engine)
    texts = gen.generate([[{"role": "user", "content": "hi"}]] * 8, 20, 1.0, 1.0, seed=4)
    assert len(set(texts)) == 8
    texts2 = gen.generate_seeded(
        [[{"role": "user", "content": "hi"}]] * 2, [SampleParams(20, 1.0, 1.0, 9)] * 2
    )
    assert texts2[0] == texts2[1]  # same prompt + same seed -> same text: the per-request semantics


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_real_vllm_gives_distinct_samples(tmp_path: Path) -> None:
    from caft.testing import save_tiny

    d = save_tiny(tmp_path / "tiny", "llama", template="chatml")
    gen = VLLMGenerator(ModelConfig(name_or_path=str(d), dtype="float32"))
    q = Question(id="x", paraphrases=("hi there",), samples_per_paraphrase=16)
    cfg = SampleConfig(seed=1, max_new_tokens=8)
    sample_answers(gen, [q], tmp_path / "a.jsonl", cfg)
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert len(rows) == 16 and len({r["answer"] for r in rows}) >= 15
    again = tmp_path / "b.jsonl"
    sample_answers(gen, [q], again, cfg)
    assert [r["answer"] for r in read_jsonl(again)] == [r["answer"] for r in rows]
