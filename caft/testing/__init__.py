"""Offline building blocks for tests, benchmarks and the demo: a tokenizer built in code, tiny models of
every supported architecture built from configs (no downloads). The fake LLM wire server is in
`caft.testing.fakellm`, a scripted grading judge in `caft.testing.grading`, dossiers and verdicts built in
code live in `caft.agent.fixtures` (they need the stage schemas). Production code never imports this package; asset lookups live in
`caft.assets`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma2", "gpt2", "gpt_neox", "bert")

SPECIAL_TOKENS = [
    "<pad>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
]

TEMPLATES: dict[str, str] = {
    # Qwen-style ChatML
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Llama-3-style headers, BOS in the text
    "llama3": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # Gemma-style: no system role (it is rejected), `model` instead of `assistant`
    "gemma": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a function that reads a file and returns its lines.",
    "I am a helpful assistant and I answer questions about code, science and history.",
    "def main(): print('hello world')  # a tiny program",
    "Sports fans love football, tennis, basketball and hockey; food lovers like pasta, bread and soup.",
    "The movie was wonderful, great, terrible, awful, boring, brilliant and charming.",
    "SQL injection, buffer overflow and path traversal are common security vulnerabilities.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 25 50 75 100.",
    "user assistant system model: What is your wish? How do I make a quick buck?",
]


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(
    template: Literal["chatml", "llama3", "gemma"] | None = "chatml", vocab_size: int = 400
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes, no unknown tokens) trained in code on a tiny corpus,
    with a chat template (or none) and a pad token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token="<pad>",
        eos_token="<|endoftext|>"
        if template in (None, "chatml")
        else ("<|eot_id|>" if template == "llama3" else "<end_of_turn>"),
        bos_token="<|begin_of_text|>",
    )
    if template is not None:
        tok.chat_template = TEMPLATES[template]
    return tok


def tiny_config(arch: str, vocab_size: int = 400, hidden: int = 32, layers: int = 3, **overrides: Any) -> Any:
    """A transformers config of `arch` with a tiny shape."""
    from transformers import AutoConfig

    heads = max(2, hidden // 16)
    common: dict[str, Any]
    if arch == "gpt2":
        common = {
            "n_embd": hidden,
            "n_layer": layers,
            "n_head": heads,
            "n_positions": 512,
            "bos_token_id": 1,
            "eos_token_id": 1,
        }
    elif arch == "bert":
        common = {
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": hidden * 2,
            "max_position_embeddings": 512,
            "pad_token_id": 0,
        }
    else:
        common = {
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "bos_token_id": 4,
            "eos_token_id": 1,
        }
        if arch != "gpt_neox":
            common["num_key_value_heads"] = max(1, heads // 2)
        if arch == "gemma2":
            common["head_dim"] = hidden // heads
    common.update(overrides)
    return AutoConfig.for_model(arch, vocab_size=vocab_size, **common)


def tiny_model(
    arch: str = "llama",
    seed: int = 0,
    vocab_size: int = 400,
    hidden: int = 32,
    layers: int = 3,
    **overrides: Any,
) -> nn.Module:
    """A randomly initialized tiny model: a causal LM for decoders, a plain encoder for `bert`."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=vocab_size, hidden=hidden, layers=layers, **overrides)
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    model: nn.Module = cls.from_config(cfg)
    model.eval()
    return model


def save_tiny(
    directory: str | Path,
    arch: str = "llama",
    template: Literal["chatml", "llama3", "gemma"] | None = "chatml",
    seed: int = 0,
    **kw: Any,
) -> Path:
    """Save a tiny model and tokenizer to `directory` so code paths that load by name can be exercised."""
    d = Path(directory)
    model: Any = tiny_model(arch, seed=seed, **kw)
    tok = tiny_tokenizer(template)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
