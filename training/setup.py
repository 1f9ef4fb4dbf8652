"""Everything before the first step: read and check the data, load the model, check the subspace against
the model, tokenize, wrap LoRA. Every user error surfaces here, before any training starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.config import ModelConfig
from caft.errors import ConfigError, DataError, SubspaceError
from caft.training.data import (
    LabelSpace,
    ReadReport,
    Tokenized,
    TokenizeStats,
    read_chat_jsonl,
    read_classification_jsonl,
    split_holdout,
    tokenize_chat,
    tokenize_choice,
    tokenize_texts,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from caft.sites import Sites
    from caft.subspace import Subspace
    from caft.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """The model and data a run trains on."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    sites: Sites
    device: torch.device
    train: list[Tokenized]
    held_out: list[Tokenized]
    subspace: Subspace | None
    letter_ids: list[int] | None = None
    label_names: list[str] | None = None
    data_report: dict[str, Any] = field(default_factory=dict)


def read_examples(cfg: TrainConfig) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Read and validate the training (and held-out) rows; nothing heavy is loaded yet."""
    if cfg.data.path is None:
        raise ConfigError("no training data: pass --data FILE.jsonl (or set data.path)")
    reader = read_chat_jsonl if cfg.objective == "chat" else read_classification_jsonl
    rep = ReadReport()
    rows: list[Any] = list(reader(cfg.data.path, skip_invalid=cfg.data.skip_invalid, report=rep))
    report: dict[str, Any] = {"train_file": rep.to_json()}
    if cfg.data.eval_path is not None:
        erep = ReadReport()
        held: list[Any] = list(reader(cfg.data.eval_path, skip_invalid=cfg.data.skip_invalid, report=erep))
        report["eval_file"] = erep.to_json()
    else:
        rows, held = split_holdout(rows, cfg.data.eval_fraction, cfg.seed)
    return rows, held, report


def load_subspace(cfg: TrainConfig, sites: Sites, given: Subspace | None) -> Subspace | None:
    """The subspace to ablate, checked against the model (hidden size, layer count)."""
    from caft.subspace import Subspace
    from caft.training.ablation import random_subspace

    if given is not None:
        given.validate(d_model=sites.d_model, n_layers=sites.n_layers)
        sub = given
    elif cfg.ablation.subspace is not None:
        path = Path(cfg.ablation.subspace)
        try:
            sub = Subspace.load(path, d_model=sites.d_model, n_layers=sites.n_layers)
        except SubspaceError as e:
            raise SubspaceError(
                f"subspace {path} does not fit the model ({sites.model_type}, d_model={sites.d_model}, "
                f"{sites.n_layers} layers): {e}"
            ) from None
    elif cfg.ablation.random is not None:
        sub = random_subspace(cfg.ablation.random, sites.d_model, cfg.ablation.random_seed, sites.n_layers)
    else:
        return None
    if sub.is_empty:
        log.warning("the subspace has no directions: this run is plain fine-tuning")
    return sub


def load_steer_vectors(path: str, sites: Sites) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise SubspaceError(f"steering vectors file not found: {p}")
    raw = load_file(str(p))
    out: dict[int, torch.Tensor] = {}
    for key, v in raw.items():
        if not key.startswith("layer."):
            raise SubspaceError(f"{p}: unexpected tensor name {key!r} (expected layer.<L>)")
        layer = sites.resolve_layer(int(key[6:]))
        if v.numel() != sites.d_model:
            raise SubspaceError(f"{p}: {key} has {v.numel()} values, expected d_model={sites.d_model}")
        out[layer] = v.reshape(-1).float()
    return out


def prepare(cfg: TrainConfig, mcfg: ModelConfig, given_subspace: Subspace | None = None) -> Prepared:
    """Read data, load the model, check the subspace, tokenize, set up LoRA / frozen parts."""
    import torch

    from caft.sites import Sites

    rows, held_rows, report = read_examples(cfg)
    torch.manual_seed(cfg.seed)
    label_names: list[str] | None = None
    if cfg.objective == "encoder_classifier":
        from caft.models import load_tokenizer, resolve_device
        from caft.training.classifier import EncoderClassifier

        if cfg.method != "full":
            raise ConfigError("the encoder classifier trains the encoder itself: set method: full")
        space = LabelSpace.infer(rows + held_rows, cfg.data.label_names)
        label_names = space.names
        tok = load_tokenizer(mcfg.name_or_path, "right", mcfg.revision)
        device = resolve_device(mcfg.device)
        model: Any = EncoderClassifier.from_encoder(mcfg.name_or_path, label_names, seed=cfg.seed).to(device)
    else:
        from caft.models import load_model

        if mcfg.kind != "causal_lm":
            raise ConfigError(f"objective {cfg.objective!r} needs a causal LM (model.kind: causal_lm)")
        loaded = load_model(mcfg, padding_side="right", adapter_trainable=True)
        model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    sites = Sites.of(model)
    subspace = load_subspace(cfg, sites, given_subspace)

    max_length = _max_length(cfg, mcfg, model)
    letter_ids = None
    stats: dict[str, TokenizeStats] = {}
    if cfg.objective == "chat":
        from caft.chat import ChatFormatter

        fmt = ChatFormatter(tok, mcfg.chat.template)
        train, stats["train"] = tokenize_chat(rows, fmt, max_length, cfg.data.overlong)
        held, stats["eval"] = (
            tokenize_chat(held_rows, fmt, max_length, cfg.data.overlong)
            if held_rows
            else ([], TokenizeStats())
        )
    elif cfg.objective == "choice_lm":
        space = LabelSpace.infer(rows + held_rows, cfg.data.label_names)
        label_names = space.names
        train, letter_ids, stats["train"] = tokenize_choice(rows, tok, space, max_length, cfg.data.overlong)
        held = []
        if held_rows:
            held, held_letters, stats["eval"] = tokenize_choice(
                held_rows, tok, space, max_length, cfg.data.overlong
            )
            if len(held_letters) > len(letter_ids):
                raise DataError("the held-out rows have more options than the training rows")
    else:
        space = LabelSpace(label_names or [])
        train, stats["train"] = tokenize_texts(rows, tok, space, max_length, cfg.data.overlong)
        held = []
        if held_rows:
            held, stats["eval"] = tokenize_texts(held_rows, tok, space, max_length, cfg.data.overlong)
    report["tokenize"] = {k: v.to_json() for k, v in stats.items()}
    report["max_length"] = max_length

    model = _make_trainable(cfg, model)
    model.train()
    return Prepared(
        model=model,
        tokenizer=tok,
        sites=Sites.of(model),
        device=device,
        train=train,
        held_out=held,
        subspace=subspace,
        letter_ids=letter_ids,
        label_names=label_names,
        data_report=report,
    )


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in backward instead of keeping them (transformers models)."""
    # transformers renamed it activation checkpointing (the old name warns, and goes in v6)
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        enable = getattr(model, f"{name}_enable", None)
        if enable is not None:
            enable(**{f"{name}_kwargs": {"use_reentrant": False}})
            return
    raise ConfigError(
        "optim.gradient_checkpointing needs a transformers model (this one has no "
        "activation_checkpointing_enable); turn it off"
    )


def _max_length(cfg: TrainConfig, mcfg: ModelConfig, model: Any) -> int:
    """The configured length, capped by the model's position limit (BERT-style encoders stop at 512)."""
    want = cfg.data.max_length or mcfg.chat.max_length
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < want:
        if cfg.data.max_length is not None:
            raise ConfigError(
                f"data.max_length={want} exceeds the model's {limit} positions; set data.max_length <= {limit}"
            )
        log.info("max length capped at the model's %d positions", limit)
        return limit
    return want


def _make_trainable(cfg: TrainConfig, model: Any) -> Any:
    """Wrap LoRA adapters (method lora) or unfreeze everything (full), then apply freeze_embeddings."""
    from caft.models import is_peft_model

    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        if is_peft_model(model):
            raise ConfigError(
                "the model already carries an adapter; merge it first or train it with method: full"
            )
        targets: Any = cfg.lora.target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        try:
            model = get_peft_model(
                model,
                LoraConfig(
                    r=cfg.lora.r,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    use_rslora=cfg.lora.rslora,
                    target_modules=targets,
                    bias="none",
                    task_type="CAUSAL_LM",
                ),
            )
        except ValueError as e:
            raise ConfigError(
                f"LoRA target modules {cfg.lora.target_modules} do not fit this model: {e}. "
                "Set lora.target_modules to module names it has (or [all-linear])"
            ) from None
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.freeze_embeddings:
        emb = _input_embeddings(model)
        for p in emb.parameters():
            p.requires_grad_(False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_train == 0:
        raise ConfigError("nothing to train: every parameter is frozen")
    return model


def _input_embeddings(model: Any) -> nn.Module:
    from caft.training.classifier import EncoderClassifier

    if isinstance(model, EncoderClassifier):
        return (
            model.encoder.embeddings
            if hasattr(model.encoder, "embeddings")
            else model.encoder.get_input_embeddings()
        )
    emb: nn.Module = model.get_input_embeddings()
    return emb
