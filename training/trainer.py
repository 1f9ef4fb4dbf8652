"""The training loop: plain fine-tuning or fine-tuning with a concept ablation, LoRA or full.

    result = train(TrainConfig(...), out_dir="runs/x/train", model=ModelConfig(name_or_path=...))
    result.final_path      # a peft adapter dir or a full model dir: loads with transformers, no caft code

Output directory::

    caft_training.json     config, subspace digest, ablation mode, data counts, final metrics (written last)
    train_log.jsonl        one record per logged step (loss, lr, grad norm, tokens/s) and per evaluation
    subspace/              the subspace that was ablated (a copy; the random baseline's too)
    ablation_means.safetensors   reference means of mode `mean`
    checkpoints/step-N/    resumable state (see caft.training.checkpoint)
    final/                 the trained adapter or model (+ tokenizer, + caft_training.json)

The ablation is applied through an nnsight trace at every token position of the subspace's layers, in
training steps and held-out evaluations only; the loop does not know which mode runs. Nothing stays
attached to the model, so `final/` holds plain weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from caft.config import ModelConfig
from caft.env import package_versions, scrub_obj
from caft.errors import CaftError, ConfigError
from caft.rundir import SUBSPACE_DIR, JsonlWriter, atomic_write_json
from caft.training.ablation import (
    Ablation,
    SteerAblation,
    compute_subspace_means,
    load_means,
    make_ablation,
    save_means,
)
from caft.training.checkpoint import load_checkpoint, save_checkpoint
from caft.training.classifier import EncoderClassifier
from caft.training.data import Tokenized, batch_order, collate, count_tokens
from caft.training.distributed import Dist, attach_ablation, loss_units, shard
from caft.training.distributed import setup as setup_distributed
from caft.training.forward import ablated_forward, wrap
from caft.training.objectives import ObjectiveLoss
from caft.training.penalty import (
    DEFAULT_QUANTILE,
    PENALTY_FILE,
    load_reference,
    reference_magnitudes,
    save_reference,
    take_penalty,
)
from caft.training.runstate import (
    FINAL_DIR,
    LOG_FILE,
    MEANS_FILE,
    RECORD_FILE,
    RunState,
    open_run,
    training_fingerprint,
)
from caft.training.setup import Prepared, load_steer_vectors, prepare

if TYPE_CHECKING:
    from caft.subspace import Subspace
    from caft.training.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["FINAL_DIR", "LOG_FILE", "MEANS_FILE", "RECORD_FILE", "DivergenceError", "TrainResult", "train"]


class DivergenceError(CaftError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """Where the run's files are, its last metrics, and (when this call trained) the trained model in
    memory, hook-free, in eval mode."""

    out_dir: Path
    final_path: Path
    log_path: Path
    metrics: dict[str, Any]
    model: Any = field(default=None, repr=False)


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    model: ModelConfig | None = None,
    subspace: Subspace | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Fine-tune as configured and write the final adapter/model to `out_dir/final`.

    `model` overrides `cfg.model` (a run passes its base model here). `subspace` overrides
    `cfg.ablation.subspace`. `resume` continues from the newest checkpoint in `out_dir`, or returns the
    finished run there when its fingerprint (`caft.training.runstate.training_fingerprint`) matches this
    call, and raises `RunDirError` naming what changed when it does not. Without `resume`, an `out_dir` that
    already holds a run is an error (nothing is overwritten). `stop_after_steps` ends the process early as if
    interrupted (after that many optimizer steps, with a checkpoint), for tests and time-boxed jobs; a later
    `resume=True` call continues exactly.
    """
    mcfg = model or cfg.model
    if mcfg is None:
        raise ConfigError("no model to fine-tune: pass --base-model (or set model.name_or_path)")
    out = Path(out_dir)
    log_path = out / LOG_FILE
    fingerprint = training_fingerprint(cfg, mcfg, subspace)
    dist = setup_distributed(mcfg.device)
    run = _open_run(dist, out, resume, fingerprint)
    if run.finished is not None:
        return TrainResult(out, out / FINAL_DIR, log_path, run.finished.get("metrics", {}))
    if dist.enabled and dist.accelerator.device.type != "cpu":
        mcfg = mcfg.model_copy(update={"device": str(dist.accelerator.device)})  # one device per rank

    _seed_everything(cfg.seed)
    prep = prepare(cfg, mcfg, subspace)
    if cfg.optim.gradient_checkpointing:
        _enable_gradient_checkpointing(prep.model)
    total_steps, micro_per_epoch = _plan(cfg, len(prep.train))
    abl = _build_ablation(cfg, prep, out, resume, save=dist.is_main)
    objective = ObjectiveLoss(cfg.objective, prep.letter_ids, model=prep.model)
    optimizer, scheduler = _optimizer(cfg, prep.model, total_steps)
    if run.checkpoint is not None:
        load_checkpoint(run.checkpoint, prep.model, optimizer, scheduler)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if prep.subspace is not None and not (out / SUBSPACE_DIR).exists():
            prep.subspace.save(out / SUBSPACE_DIR)

    # with several ranks (a DDP wrapper to call) or gradient checkpointing the ablation is hooked onto the
    # layers for the whole loop; else one nnsight trace per forward
    hooked = dist.enabled or cfg.optim.gradient_checkpointing
    wrapped = dist.wrap(prep.model)
    forward = _make_forward(cfg, prep, objective, None if hooked else abl, wrapped)
    batches = _MicroBatches(prep.train, cfg, micro_per_epoch, int(prep.tokenizer.pad_token_id))
    header = _header(cfg, prep, abl, run.start_step, total_steps, micro_per_epoch)
    header["ranks"] = dist.world
    log.info("training: %s", header)

    def checkpoint(step: int) -> None:
        if dist.is_main:
            info = {"fingerprint": fingerprint, "total_steps": total_steps}
            save_checkpoint(out, step, prep.model, optimizer, scheduler, info, cfg.keep_checkpoints)
        dist.barrier()

    writer = JsonlWriter(log_path) if dist.is_main else None
    if writer is not None:
        writer.write(header)
    bar = _progress(cfg, total_steps, run.start_step) if dist.is_main else None
    metrics: dict[str, Any] = {}
    ga = cfg.optim.grad_accum
    try:
        stack = contextlib.ExitStack()
        if hooked:
            stack.enter_context(attach_ablation(prep.model, prep.sites, abl))
        with stack:
            prep.model.train()
            for step in range(run.start_step, total_steps):
                t0 = time.perf_counter()
                loss_sum, tokens = 0.0, 0
                for micro in range(ga):
                    batch, weight = batches.part(step * ga + micro, dist.rank, dist.world)
                    with dist.no_sync(wrapped, sync=micro == ga - 1):
                        loss = take_penalty(abl, objective.loss(forward(batch), batch))
                        (loss * (weight * dist.world) / ga).backward()  # alone: loss * 1.0 / ga
                    loss_sum += loss.item() * weight / ga
                    tokens += count_tokens(batch) if weight else 0
                loss_sum, tokens_f = dist.sum([loss_sum, float(tokens)])
                tokens = int(tokens_f)
                metrics = _after_backward(
                    cfg,
                    prep,
                    optimizer,
                    scheduler,
                    step,
                    total_steps,
                    loss_sum,
                    tokens,
                    t0,
                    writer,
                    bar,
                    metrics,
                )
                done = step + 1
                if prep.held_out and cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                    ev = _evaluate(cfg, prep, objective, forward)
                    if writer is not None:
                        writer.write({"event": "eval", "step": done, **ev})
                    metrics.update(ev)
                saved = bool(cfg.save_every) and done % cfg.save_every == 0 and done < total_steps
                if saved:
                    checkpoint(done)
                if stop_after_steps is not None and done >= stop_after_steps and done < total_steps:
                    if not saved:
                        checkpoint(done)
                    if writer is not None:
                        writer.write({"event": "stopped", "step": done})
                    return TrainResult(out, out / FINAL_DIR, log_path, dict(metrics), model=prep.model)
            if prep.held_out:
                ev = _evaluate(cfg, prep, objective, forward)
                if writer is not None:
                    writer.write({"event": "eval", "step": total_steps, **ev})
                metrics.update(ev)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()

    final = out / FINAL_DIR
    if dist.is_main:
        final = _save_final(prep, out)
        record = _record(cfg, mcfg, prep, abl, metrics, total_steps, fingerprint)
        atomic_write_json(final / RECORD_FILE, record)
        atomic_write_json(out / RECORD_FILE, record)
    else:
        prep.model.eval()
    dist.barrier()
    return TrainResult(out, final, log_path, metrics, model=prep.model)


def _after_backward(
    cfg: TrainConfig,
    prep: Prepared,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    total_steps: int,
    loss_sum: float,
    tokens: int,
    t0: float,
    writer: JsonlWriter | None,
    bar: Any,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Check the loss, clip, step the optimizer and the schedule, log; the updated metrics."""
    done = step + 1
    if not math.isfinite(loss_sum):
        raise DivergenceError(
            f"the loss became {loss_sum} at step {done}; lower optim.lr or use precision fp32 "
            f"(checkpoints up to step {step} are kept)"
        )
    grad_norm = _clip(cfg, prep.model)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    metrics.update(step=done, loss=loss_sum, lr=lr)
    if writer is not None and (done % cfg.log_every == 0 or done == total_steps):
        writer.write(_step_record(done, loss_sum, lr, grad_norm, tokens, dt))
    if bar is not None:
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / max(dt, 1e-9):.0f}")
        bar.update(1)
    return metrics


def _open_run(dist: Dist, out: Path, resume: bool, fingerprint: dict[str, Any]) -> RunState:
    """`open_run` on rank 0 (it may rewrite the log), its answer, or its error, on every rank."""
    if not dist.enabled:
        return open_run(out, resume, fingerprint)
    answer: RunState | CaftError
    try:
        answer = open_run(out, resume, fingerprint) if dist.is_main else RunState()
    except CaftError as e:
        answer = e
    answer = dist.from_main(answer)
    if isinstance(answer, CaftError):
        raise answer
    return answer


def _enable_gradient_checkpointing(model: Any) -> None:
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


# ---- pieces of the loop -------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _plan(cfg: TrainConfig, n_examples: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches per epoch)."""
    micro_per_epoch = math.ceil(n_examples / cfg.optim.batch_size)
    total = max(1, math.ceil(cfg.optim.epochs * micro_per_epoch / cfg.optim.grad_accum))
    if cfg.optim.max_steps is not None:
        total = cfg.optim.max_steps
    return total, micro_per_epoch


def _header(
    cfg: TrainConfig, prep: Prepared, abl: Ablation | None, start: int, total: int, micro_per_epoch: int
) -> dict[str, Any]:
    """The first log record of a (resumed) run: its plan and its sizes."""
    return {
        "event": "start",
        "step": start,
        "total_steps": total,
        "examples": len(prep.train),
        "held_out": len(prep.held_out),
        "micro_batches_per_epoch": micro_per_epoch,
        "effective_batch": cfg.optim.batch_size * cfg.optim.grad_accum,
        "trainable_params": sum(p.numel() for p in prep.model.parameters() if p.requires_grad),
        "ablation": abl.describe() if abl is not None else None,
    }


class _MicroBatches:
    """Micro-batch `index` of the whole run (epoch-major), collated; the order of each epoch is seeded, so
    a resumed run finds the same batches from the index alone."""

    def __init__(self, items: list[Tokenized], cfg: TrainConfig, per_epoch: int, pad_id: int) -> None:
        self.items, self.per_epoch, self.pad_id = items, per_epoch, pad_id
        self.batch_size, self.seed = cfg.optim.batch_size, cfg.seed
        self._epoch, self._order = -1, [[0]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return collate(self._items(index), self.pad_id)

    def _items(self, index: int) -> list[Tokenized]:
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, batch_order(len(self.items), self.batch_size, self.seed, epoch)
        return [self.items[j] for j in self._order[i]]

    def part(self, index: int, rank: int, world: int) -> tuple[dict[str, torch.Tensor], float]:
        """Rank `rank`'s share of micro-batch `index`, collated, and its weight: its share of the loss units
        (weights sum to 1 over the ranks). A rank left without examples runs one with weight 0, so that
        every rank takes part in the gradient all-reduce."""
        items = self._items(index)
        if world == 1:
            return collate(items, self.pad_id), 1.0
        mine = shard(items, rank, world)
        if not mine:
            return collate(items[:1], self.pad_id), 0.0
        batch = collate(mine, self.pad_id)
        return batch, loss_units(batch) / max(loss_units(collate(items, self.pad_id)), 1)


def _make_forward(
    cfg: TrainConfig, prep: Prepared, objective: ObjectiveLoss, abl: Ablation | None, model: Any
) -> Callable[[dict[str, torch.Tensor]], Any]:
    """batch -> output of `model` (the model, or its DDP wrapper), with `abl` through an nnsight trace when
    given (else the caller has hooked the ablation on, or there is none), under autocast."""
    nn_model = wrap(prep.model) if abl is not None else None
    autocast = _autocast(cfg, prep.device)

    def forward(batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: _to(v, prep.device) for k, v in objective.inputs(batch).items()}
        with autocast():
            if abl is not None:
                return objective.run(lambda: ablated_forward(nn_model, prep.sites, abl, inputs))
            return objective.run(lambda: model(**inputs))

    return forward


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _clip(cfg: TrainConfig, model: Any) -> float | None:
    """Clip the global gradient norm as configured; returns the norm before clipping."""
    if cfg.optim.max_grad_norm is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    return float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm))


def _step_record(
    step: int, loss: float, lr: float, grad_norm: float | None, tokens: int, dt: float
) -> dict[str, Any]:
    return {
        "event": "step",
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / dt if dt > 0 else None,
        "seconds": dt,
    }


def _optimizer(cfg: TrainConfig, model: Any, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups: list[dict[str, Any]] = [{"params": body, "lr": cfg.optim.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.optim.head_lr or cfg.optim.lr})
    opt = torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    warmup = cfg.optim.warmup_steps
    if warmup is None:
        warmup = round((cfg.optim.warmup_ratio or 0.0) * total_steps)
    linear = cfg.optim.schedule == "linear"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not linear:
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _build_ablation(
    cfg: TrainConfig, prep: Prepared, out: Path, resume: bool, save: bool = True
) -> Ablation | None:
    sub = prep.subspace
    if sub is None or sub.is_empty:
        return None
    vectors = None
    if cfg.ablation.steer_vectors is not None:
        vectors = load_steer_vectors(cfg.ablation.steer_vectors, prep.sites)
    means = None
    if cfg.ablation.mode == "mean" or (cfg.ablation.mode == "steer" and vectors is None):
        path = out / MEANS_FILE
        if resume and path.is_file():
            means = load_means(path)
        else:
            means = compute_subspace_means(prep.model, _mean_batches(cfg, prep), sub)
            if save:  # every rank computes the same means from the same batches; one writes them
                out.mkdir(parents=True, exist_ok=True)
                save_means(path, means)
    reference = _penalty_reference(cfg, prep, out, resume, save) if cfg.ablation.mode == "penalty" else None
    return make_ablation(
        cfg.ablation.mode,
        sub,
        means=means,
        steer_coef=cfg.ablation.steer_coef,
        vectors=vectors,
        penalty_coef=cfg.ablation.penalty_coef,
        reference=reference,
    )


def _penalty_reference(
    cfg: TrainConfig, prep: Prepared, out: Path, resume: bool, save: bool
) -> dict[int, torch.Tensor]:
    """Mode `penalty`: the base model's reference magnitudes, computed once and kept next to the run."""
    assert prep.subspace is not None
    path = out / PENALTY_FILE
    if resume and path.is_file():
        return load_reference(path)
    q = cfg.ablation.penalty_quantile
    ref = reference_magnitudes(
        prep.model, _mean_batches(cfg, prep), prep.subspace, DEFAULT_QUANTILE if q is None else q
    )
    if save:  # every rank computes the same reference; one writes it
        out.mkdir(parents=True, exist_ok=True)
        save_reference(path, ref)
    return ref


def _mean_batches(cfg: TrainConfig, prep: Prepared) -> list[dict[str, torch.Tensor]]:
    """The batches the reference means come from, weighted by the tokens that are trained on."""
    pad_id = int(prep.tokenizer.pad_token_id)
    order = batch_order(len(prep.train), cfg.optim.batch_size, cfg.seed, epoch=-1)
    batches = []
    for idx in order[: cfg.ablation.mean_batches]:
        b = collate([prep.train[j] for j in idx], pad_id)
        if "labels" in b:
            b["loss_mask"] = (b["labels"] != -100).long()
        batches.append({k: v for k, v in b.items() if k not in ("target", "last_index")})
    return batches


def _evaluate(
    cfg: TrainConfig, prep: Prepared, objective: ObjectiveLoss, forward: Callable[[Any], Any]
) -> dict[str, Any]:
    """Mean held-out loss (with the training-time ablation) and, for classification, accuracy."""
    items: list[Tokenized] = prep.held_out
    bs = cfg.optim.batch_size
    pad_id = int(prep.tokenizer.pad_token_id)
    batches = [items[i : i + bs] for i in range(0, len(items), bs)]
    if cfg.eval_batches is not None:
        batches = batches[: cfg.eval_batches]
    prep.model.eval()
    total, weight, correct, n = 0.0, 0, 0, 0
    try:
        with torch.no_grad():
            for chunk in batches:
                batch = collate(chunk, pad_id)
                output = forward(batch)
                w = int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else len(chunk)
                total += float(objective.loss(output, batch)) * w
                weight += w
                correct += objective.correct(output, batch)
                n += len(chunk)
    finally:
        prep.model.train()
    out: dict[str, Any] = {"eval_loss": total / max(weight, 1)}
    if cfg.objective != "chat":
        out["eval_accuracy"] = correct / max(n, 1)
    return out


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], Any]:
    if cfg.optim.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _progress(cfg: TrainConfig, total: int, start: int) -> Any:
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _save_final(prep: Prepared, out: Path) -> Path:
    """Write the adapter (LoRA) or the full model, plus the tokenizer, into `out/final` atomically."""
    final, tmp = out / FINAL_DIR, out / f".{FINAL_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model: Any = prep.model
    model.eval()
    if isinstance(model, EncoderClassifier):
        model.save(tmp, prep.tokenizer)
    else:
        model.save_pretrained(tmp)
        prep.tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _uses_means(abl: Ablation) -> bool:
    return abl.mode == "mean" or (isinstance(abl, SteerAblation) and abl.source == "mean_projection")


def _record(
    cfg: TrainConfig,
    mcfg: ModelConfig,
    prep: Prepared,
    abl: Ablation | None,
    metrics: dict[str, Any],
    total_steps: int,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    sub = prep.subspace
    return scrub_obj(
        {
            "format": "caft.training/1",
            "base_model": mcfg.name_or_path,
            "objective": cfg.objective,
            "method": cfg.method,
            "output": "peft_adapter"
            if cfg.method == "lora"
            else ("encoder_classifier" if cfg.objective == "encoder_classifier" else "full_model"),
            "ablation": None
            if abl is None
            else {
                **abl.describe(),
                "subspace_digest": sub.digest() if sub is not None else None,
                "means_file": MEANS_FILE if _uses_means(abl) else None,
            },
            "subspace_digest": sub.digest() if sub is not None else None,
            "label_names": prep.label_names,
            "letter_token_ids": prep.letter_ids,
            "steps": total_steps,
            "data": prep.data_report,
            "metrics": metrics,
            "fingerprint": fingerprint,
            "config": cfg.model_dump(mode="json"),
            "model": mcfg.model_dump(mode="json"),
            "versions": package_versions(),
        }
    )
