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
attached to the model, so `final/` holds plain weights. Under a launcher the same loop runs on every rank
(DDP or FSDP: see caft.training.distributed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from caft.config import ModelConfig
from caft.errors import CaftError, ConfigError
from caft.rundir import SUBSPACE_DIR, JsonlWriter, atomic_write_json
from caft.training.ablation import Ablation
from caft.training.batches import MicroBatches
from caft.training.checkpoint import checkpoint_state, load_checkpoint, save_checkpoint
from caft.training.data import count_tokens
from caft.training.distributed import attach_ablation
from caft.training.distributed import setup as setup_distributed
from caft.training.evaluate import evaluate
from caft.training.forward import make_forward
from caft.training.objectives import ObjectiveLoss
from caft.training.optim import clip_gradients, make_optimizer, plan_steps
from caft.training.output import run_record, save_final
from caft.training.penalty import take_penalty
from caft.training.run_ablation import build_ablation
from caft.training.runstate import (
    FINAL_DIR,
    LOG_FILE,
    MEANS_FILE,
    RECORD_FILE,
    RunState,
    open_run,
    training_fingerprint,
)
from caft.training.setup import Prepared, enable_gradient_checkpointing, prepare
from caft.training.sharded import final_state

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
    memory, hook-free, in eval mode (under FSDP: this rank's sharded module; `final/` holds the whole)."""

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
    # rank 0 checks the folder (it may rewrite the log); every rank gets its answer, or its error
    run = dist.on_main(lambda: open_run(out, resume, fingerprint), RunState())
    if run.finished is not None:
        return TrainResult(out, out / FINAL_DIR, log_path, run.finished.get("metrics", {}))
    if dist.enabled and dist.accelerator.device.type != "cpu":
        mcfg = mcfg.model_copy(update={"device": str(dist.accelerator.device)})  # one device per rank
    if dist.fsdp and cfg.objective == "encoder_classifier":
        raise ConfigError(
            "FSDP shards causal LMs; the encoder classifier is small enough to replicate: launch it without "
            "FSDP (DDP) or in one process"
        )

    _seed_everything(cfg.seed)
    prep = prepare(cfg, dist.load_config(mcfg), subspace)
    if cfg.optim.gradient_checkpointing:
        enable_gradient_checkpointing(prep.model)
    total_steps, micro_per_epoch = plan_steps(cfg, len(prep.train))
    abl = build_ablation(cfg, prep, out, resume, save=dist.is_main)
    # a sharded LM head cannot be read outside the forward: choice_lm takes the letters from the full logits
    objective = ObjectiveLoss(cfg.objective, prep.letter_ids, model=None if dist.fsdp else prep.model)
    # the optimizer comes after the wrap: sharding replaces the parameters
    wrapped = dist.wrap(prep.model, prep.sites)
    if dist.fsdp:
        prep.device = dist.accelerator.device
    optimizer, scheduler = make_optimizer(cfg, prep.model, total_steps)
    if run.checkpoint is not None:
        load_checkpoint(run.checkpoint, prep.model, optimizer, scheduler)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if prep.subspace is not None and not (out / SUBSPACE_DIR).exists():
            prep.subspace.save(out / SUBSPACE_DIR)

    # with several ranks (a DDP wrapper or a sharded model to call) or gradient checkpointing the ablation is
    # hooked onto the layers for the whole loop; else one nnsight trace per forward
    hooked = dist.enabled or cfg.optim.gradient_checkpointing
    forward = make_forward(cfg, prep, objective, None if hooked else abl, wrapped)
    batches = MicroBatches(prep.train, cfg, micro_per_epoch, int(prep.tokenizer.pad_token_id))
    header = _header(cfg, prep, abl, run.start_step, total_steps, micro_per_epoch)
    header["ranks"] = dist.world
    log.info("training: %s", header)

    writer = JsonlWriter(log_path) if dist.is_main else None
    if writer is not None:
        writer.write(header)
    bar = _progress(cfg, total_steps, run.start_step) if dist.is_main else None
    metrics: dict[str, Any] = {}

    def write(record: dict[str, Any]) -> None:
        if writer is not None:
            writer.write(record)

    def checkpoint(step: int) -> None:
        state = checkpoint_state(prep.model, optimizer, dist.is_main)  # gathered on every rank under FSDP
        if dist.is_main:
            info = {"fingerprint": fingerprint, "total_steps": total_steps}
            save_checkpoint(out, step, state, scheduler, info, cfg.keep_checkpoints)
        dist.barrier()

    def evaluate_at(step: int) -> None:
        ev = evaluate(cfg, prep, objective, forward)
        write({"event": "eval", "step": step, **ev})
        metrics.update(ev)

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
                done = step + 1
                record = _optimizer_step(cfg, prep, optimizer, scheduler, done, loss_sum, int(tokens_f), t0)
                metrics.update(step=done, loss=loss_sum, lr=record["lr"])
                if done % cfg.log_every == 0 or done == total_steps:
                    write(record)
                if bar is not None:
                    _show(bar, record)
                if prep.held_out and cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                    evaluate_at(done)
                saved = bool(cfg.save_every) and done % cfg.save_every == 0 and done < total_steps
                if saved:
                    checkpoint(done)
                if stop_after_steps is not None and done >= stop_after_steps and done < total_steps:
                    if not saved:
                        checkpoint(done)
                    write({"event": "stopped", "step": done})
                    return TrainResult(out, out / FINAL_DIR, log_path, dict(metrics), model=prep.model)
            if prep.held_out:
                evaluate_at(total_steps)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()

    final = out / FINAL_DIR
    state = final_state(prep.model, trainable_only=cfg.method == "lora")  # None unless sharded
    if dist.is_main:
        final = save_final(prep, out, state)
        record = run_record(cfg, mcfg, prep, abl, metrics, total_steps, fingerprint)
        atomic_write_json(final / RECORD_FILE, record)
        atomic_write_json(out / RECORD_FILE, record)
    else:
        prep.model.eval()
    dist.barrier()
    return TrainResult(out, final, log_path, metrics, model=prep.model)


def _optimizer_step(
    cfg: TrainConfig,
    prep: Prepared,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    done: int,
    loss_sum: float,
    tokens: int,
    t0: float,
) -> dict[str, Any]:
    """Check the loss, clip, step the optimizer and the schedule; the step's log record."""
    if not math.isfinite(loss_sum):
        raise DivergenceError(
            f"the loss became {loss_sum} at step {done}; lower optim.lr or use precision fp32 "
            f"(checkpoints up to step {done - 1} are kept)"
        )
    grad_norm = clip_gradients(cfg, prep.model)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {
        "event": "step",
        "step": done,
        "loss": loss_sum,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / dt if dt > 0 else None,
        "seconds": dt,
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _progress(cfg: TrainConfig, total: int, start: int) -> Any:
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _show(bar: Any, record: dict[str, Any]) -> None:
    """One optimizer step on the progress bar."""
    rate = record["tokens"] / max(record["seconds"], 1e-9)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{rate:.0f}")
    bar.update(1)
