"""Model loading: causal LMs and encoders from a hub id, a local path or a built-in name (`gemma-3-270m`,
see caft.builtin_models), peft adapters, dtype and device.

    loaded = load_model(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B-Instruct", adapter="runs/x/train/final"))
    loaded.model, loaded.tokenizer, loaded.sites, loaded.device
    with adapter_disabled(loaded.model): ...     # the base model, same weights in memory

Tokenizers are set up for batching: a pad token (the EOS token when the model has none) and a padding
side (`left` for generation, `right` for training; callers pick). Works offline with HF_HUB_OFFLINE=1 when
the files are local or cached; a model that cannot be found says so and why.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from caft.config import ModelConfig
from caft.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from caft.chat import TemplateChoice
    from caft.sites import Sites


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but no CUDA device is available; use `device: cpu`")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return table[dtype]


def looks_like_path(name: str) -> bool:
    """A model name that can only be a local path: absolute, relative (`./`, `../`, `~`), or with more than
    one `/` (a hub id is `name` or `org/name`)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_local_path(name: str, what: str = "model") -> None:
    """Raise a `ModelError` saying so when `name` is a local path that does not exist (before any hub
    lookup, whose error would blame the network or offline mode)."""
    path = Path(name).expanduser()
    if looks_like_path(name) and not path.exists():
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        raise ModelError(
            f"cannot load {name!r}: no such {what} directory ({path.absolute()} does not exist"
            + (f"; the nearest existing folder is {parent}" if parent is not None else "")
            + "). Check the path, or give a hub id such as org/name"
        )


def _not_found(name: str, err: Exception) -> ModelError:
    if not Path(name).expanduser().exists() and "/" in name and not looks_like_path(name):
        hint_local = f" (and there is no local folder {name!r} either)"
    else:
        hint_local = ""
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    hint = (
        "HF_HUB_OFFLINE=1 is set, so only local directories and ids already in the Hugging Face cache load"
        if offline
        else "check the id or path, and your network access to the hub"
    )
    return ModelError(
        f"cannot load {name!r}{hint_local}: {hint}. ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    )


def load_tokenizer(
    name_or_path: str,
    padding_side: Literal["left", "right"] = "right",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    from caft.builtin_models import resolve_model_path

    check_local_path(name_or_path)
    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_found(name_or_path, e) from e
    return prepare_tokenizer(tok, padding_side)


def prepare_tokenizer(
    tok: PreTrainedTokenizerBase, padding_side: Literal["left", "right"] = "right"
) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (EOS if it has none) and a padding side."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an EOS token; add a pad token to it first")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    sites: Sites
    device: torch.device
    dtype: torch.dtype
    config: ModelConfig

    @property
    def has_adapter(self) -> bool:
        return is_peft_model(self.model)


def _auto_class(kind: str) -> Any:
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "encoder": transformers.AutoModel,
        "sequence_classification": transformers.AutoModelForSequenceClassification,
    }[kind]


def load_model(
    cfg: ModelConfig,
    padding_side: Literal["left", "right"] = "right",
    adapter_trainable: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load the model, its tokenizer and an optional peft adapter, on the configured device and dtype."""
    from caft.builtin_models import resolve_model_path
    from caft.sites import Sites

    check_local_path(cfg.name_or_path)
    if cfg.adapter:
        check_local_path(cfg.adapter, "adapter")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    path = resolve_model_path(cfg.name_or_path)  # a built-in name becomes its converted folder
    tok = load_tokenizer(path, padding_side, cfg.revision, cfg.trust_remote_code)
    model = load_weights(cfg, dtype, model_kwargs)
    model.to(device)
    if cfg.adapter:
        model = attach_adapter(model, cfg.adapter, trainable=adapter_trainable)
    if not adapter_trainable:
        model.eval()
    return LoadedModel(
        model=model, tokenizer=tok, sites=Sites.of(model), device=device, dtype=dtype, config=cfg
    )


def load_weights(
    cfg: ModelConfig, dtype: torch.dtype, model_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """The weights of `cfg.name_or_path` (a built-in name resolves to its folder) as `cfg.kind`, on the CPU,
    without tokenizer or adapter (also for folders that hold weights only)."""
    from caft.builtin_models import resolve_model_path

    path = resolve_model_path(cfg.name_or_path)
    try:
        model: nn.Module = _auto_class(cfg.kind).from_pretrained(
            path,
            dtype=dtype,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            **(model_kwargs or {}),
        )
    except (OSError, ValueError) as e:
        raise _not_found(cfg.name_or_path, e) from e
    return model


def load_model_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The transformers config of a hub id, a local folder or a built-in name (no weights loaded)."""
    from transformers import AutoConfig

    from caft.builtin_models import resolve_model_path

    try:
        return AutoConfig.from_pretrained(
            resolve_model_path(name_or_path), revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _not_found(name_or_path, e) from e


def same_model(a: str, b: str) -> bool:
    """Whether two model ids / paths / built-in names name the same model (a built-in name equals its
    converted folder)."""
    from caft.builtin_models import resolve_model_path

    if a == b:
        return True
    ra, rb = resolve_model_path(a), resolve_model_path(b)
    pa, pb = Path(ra), Path(rb)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return ra == rb


def is_peft_model(model: Any) -> bool:
    return type(model).__module__.startswith("peft") and hasattr(model, "disable_adapter")


def attach_adapter(model: nn.Module, adapter: str | Path, trainable: bool = False) -> nn.Module:
    """Put a saved peft adapter on `model`."""
    from peft import PeftModel

    check_local_path(str(adapter), "adapter")
    path = Path(adapter)
    if path.exists() and not (path / "adapter_config.json").is_file():
        raise ModelError(f"{path} is not a peft adapter directory (no adapter_config.json)")
    try:
        wrapped: nn.Module = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    except (OSError, ValueError) as e:
        raise _not_found(str(adapter), e) from e
    return wrapped


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model by switching the peft adapter off (a no-op for models without one)."""
    if is_peft_model(model):
        with cast(Any, model).disable_adapter():
            yield model
    else:
        yield model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold a peft adapter into the base weights and return the plain transformers model."""
    if not is_peft_model(model):
        return model
    merged: nn.Module = cast(Any, model).merge_and_unload()
    return merged


def generate_chat(
    loaded: LoadedModel,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 8,
    template: str | None = None,
) -> list[str]:
    """Sample one reply per conversation (each ending with a user turn), batched with left padding.

    Any hooks or nnsight edits active on `loaded.model` apply (steering, test-time ablation). `temperature=0`
    is greedy decoding. Returns the decoded replies without the prompt, special tokens skipped.
    """
    import torch

    from caft.chat import ChatFormatter

    model, tok = loaded.model, loaded.tokenizer
    choice = cast("TemplateChoice", template or loaded.config.chat.template)
    fmt = ChatFormatter(tok, choice)
    old_side = tok.padding_side
    tok.padding_side = "left"
    gen = torch.Generator(device="cpu")
    if seed is not None:
        torch.manual_seed(seed)
        gen.manual_seed(seed)
    out: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            prompts = [{"input_ids": fmt.prompt_ids(c)} for c in chunk]
            batch = tok.pad(prompts, return_tensors="pt").to(loaded.device)
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kwargs.update(do_sample=False)
            with torch.no_grad():
                ids = cast(Any, model).generate(**batch, **kwargs)  # (B, T_prompt + T_new)
            new = ids[:, batch["input_ids"].shape[1] :]
            out.extend(tok.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
    return out
