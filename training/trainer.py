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
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from caft.training.data import Tokenized, batch_order, collate, count_tokens
from caft.training.objectives import Task

from caft.config import ModelConfig
from caft.errors import CaftError, ConfigError, RunDirError
from caft.rundir import JsonlWriter, atomic_write_json, read_jsonl

if TYPE_CHECKING:
    import torch
    from caft.training.ablation import Ablation
    from caft.training.config import TrainConfig
    from caft.training.setup import Prepared

    from caft.subspace import Subspace

log = logging.getLogger(__name__)

RECORD_FILE = "caft_training.json"
LOG_FILE = "train_log.jsonl"
FINAL_DIR = "final"
MEANS_FILE = "ablation_means.safetensors"
# settings that do not change the numbers, so a resumed run may differ in them
_RESUME_FREE = {"progress", "keep_checkpoints", "log_every", "eval_every", "eval_batches", "save_every"}


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
    `cfg.ablation.subspace`. `resume` continues from the newest checkpoint in `out_dir`; without it, an
    `out_dir` that already holds a run is an error (nothing is overwritten). `stop_after_steps` ends the
    process early as if interrupted (after that many optimizer steps, with a checkpoint), for tests and
    time-boxed jobs; a later `resume=True` call continues exactly.
    """
    import torch
    from caft.training.setup import prepare

    mcfg = model or cfg.model
    if mcfg is None:
        raise ConfigError("no model to fine-tune: pass --base-model (or set model.name_or_path)")
    out = Path(out_dir)
    record_path, log_path = out / RECORD_FILE, out / LOG_FILE
    if record_path.is_file() and (out / FINAL_DIR).is_dir():
        if resume:
            log.info("%s already holds a finished run; nothing to do", out)
            rec = json.loads(record_path.read_text(encoding="utf-8"))
            return TrainResult(out, out / FINAL_DIR, log_path, rec.get("metrics", {}))
        raise RunDirError(f"{out} already holds a finished training run; choose another --out")
    checkpoints = list_checkpoints(out)
    if not resume and (checkpoints or log_path.exists()):
        raise RunDirError(
            f"{out} already holds a partial training run; pass --resume to continue it, or choose another --out"
        )

    _seed_everything(cfg.seed)
    prep = prepare(cfg, mcfg, subspace)
    total_steps, micro_per_epoch = _plan(cfg, len(prep.train))
    abl = _build_ablation(cfg, prep, out, resume)
    task = Task(cfg.objective, prep.letter_ids)
    optimizer, scheduler = _optimizer(cfg, prep.model, total_steps)

    fingerprint = _fingerprint(cfg, mcfg, prep.subspace)
    start_step = 0
    if resume and checkpoints:
        ckpt = checkpoints[-1]
        if ckpt.info.get("fingerprint") != fingerprint:
            raise RunDirError(
                f"{ckpt.path} was written with a different configuration, model or subspace; resuming needs "
                f"the same settings (only {', '.join(sorted(_RESUME_FREE))} and model.device may change): "
                "restore them, or start a new --out directory"
            )
        load_checkpoint(ckpt, prep.model, optimizer, scheduler)
        start_step = ckpt.step
        log.info("resuming %s at step %d of %d", out, start_step, total_steps)
    elif resume:
        log.info("no checkpoint in %s: starting from step 0", out)
    if resume:
        _cut_log(log_path, start_step)
    out.mkdir(parents=True, exist_ok=True)
    if prep.subspace is not None and not (out / "subspace").exists():
        prep.subspace.save(out / "subspace")

    nn_model = None
    if abl is not None:
        from caft.training.forward import wrap

        nn_model = wrap(prep.model)
    header = {
        "event": "start",
        "step": start_step,
        "total_steps": total_steps,
        "examples": len(prep.train),
        "held_out": len(prep.held_out),
        "micro_batches_per_epoch": micro_per_epoch,
        "effective_batch": cfg.optim.batch_size * cfg.optim.grad_accum,
        "trainable_params": sum(p.numel() for p in prep.model.parameters() if p.requires_grad),
        "ablation": abl.describe() if abl is not None else None,
    }
    log.info("training: %s", header)
    pad_id = int(prep.tokenizer.pad_token_id)
    autocast = _autocast(cfg, prep.device)

    def forward(batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: v.to(prep.device) for k, v in task.inputs(batch).items()}
        with autocast():
            if abl is not None:
                from caft.training.forward import ablated_forward

                return ablated_forward(nn_model, prep.sites, abl, inputs)
            return prep.model(**inputs)

    orders: dict[int, list[list[int]]] = {}

    def micro_batch(index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(index, micro_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batch_order(len(prep.train), cfg.optim.batch_size, cfg.seed, epoch)
        return collate([prep.train[j] for j in orders[epoch][i]], pad_id)

    def checkpoint(step: int) -> None:
        info = {"fingerprint": fingerprint, "total_steps": total_steps}
        save_checkpoint(out, step, prep.model, optimizer, scheduler, info, cfg.keep_checkpoints)

    writer = JsonlWriter(log_path)
    writer.write(header)
    bar = _progress(cfg, total_steps, start_step)
    metrics: dict[str, Any] = {}
    ga = cfg.optim.grad_accum
    try:
        prep.model.train()
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            loss_sum, tokens = 0.0, 0
            for micro in range(ga):
                batch = micro_batch(step * ga + micro)
                loss = task.loss(forward(batch), batch)
                (loss / ga).backward()
                loss_sum += loss.item() / ga
                tokens += count_tokens(batch)
            done = step + 1
            if not math.isfinite(loss_sum):
                raise DivergenceError(
                    f"the loss became {loss_sum} at step {done}; lower optim.lr or use precision fp32 "
                    f"(checkpoints up to step {step} are kept)"
                )
            grad_norm = None
            if cfg.optim.max_grad_norm is not None:
                params = [p for p in prep.model.parameters() if p.requires_grad]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            metrics.update(step=done, loss=loss_sum, lr=lr)
            if done % cfg.log_every == 0 or done == total_steps:
                writer.write(
                    {
                        "event": "step",
                        "step": done,
                        "loss": loss_sum,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": tokens,
                        "tokens_per_s": tokens / dt if dt > 0 else None,
                        "seconds": dt,
                    }
                )
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / max(dt, 1e-9):.0f}")
                bar.update(1)
            if prep.held_out and cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                ev = _evaluate(cfg, prep, task, forward, pad_id)
                writer.write({"event": "eval", "step": done, **ev})
                metrics.update(ev)
            saved = bool(cfg.save_every) and done % cfg.save_every == 0 and done < total_steps
            if saved:
                checkpoint(done)
            if stop_after_steps is not None and done >= stop_after_steps and done < total_steps:
                if not saved:
                    checkpoint(done)
                writer.write({"event": "stopped", "step": done})
                return TrainResult(out, out / FINAL_DIR, log_path, dict(metrics), model=prep.model)
        if prep.held_out:
            ev = _evaluate(cfg, prep, task, forward, pad_id)
            writer.write({"event": "eval", "step": total_steps, **ev})
            metrics.update(ev)
    finally:
        if bar is not None:
            bar.close()
        writer.close()

    final = _save_final(prep, out)
    record = _record(cfg, mcfg, prep, abl, metrics, total_steps)
    atomic_write_json(final / RECORD_FILE, record)
    atomic_write_json(record_path, record)
    return TrainResult(out, final, log_path, metrics, model=prep.model)


# ---- pieces of the loop -------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

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


def _optimizer(cfg: TrainConfig, model: Any, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    import torch

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


def _build_ablation(cfg: TrainConfig, prep: Prepared, out: Path, resume: bool) -> Ablation | None:
    from caft.training.ablation import compute_subspace_means, make_ablation

    sub = prep.subspace
    if sub is None or sub.is_empty:
        return None
    vectors = None
    if cfg.ablation.steer_vectors is not None:
        from caft.training.setup import load_steer_vectors

        vectors = load_steer_vectors(cfg.ablation.steer_vectors, prep.sites)
    means = None
    if cfg.ablation.mode == "mean":
        from safetensors.torch import load_file, save_file

        path = out / MEANS_FILE
        if resume and path.is_file():
            means = {int(k.split(".")[1]): v for k, v in load_file(str(path)).items()}
        else:
            pad_id = int(prep.tokenizer.pad_token_id)
            order = batch_order(len(prep.train), cfg.optim.batch_size, cfg.seed, epoch=-1)
            batches = []
            for idx in order[: cfg.ablation.mean_batches]:
                b = collate([prep.train[j] for j in idx], pad_id)
                if "labels" in b:  # weight the mean by the tokens that are trained on
                    b["loss_mask"] = (b["labels"] != -100).long()
                batches.append({k: v for k, v in b.items() if k not in ("target", "last_index")})
            means = compute_subspace_means(prep.model, batches, sub)
            out.mkdir(parents=True, exist_ok=True)
            save_file({f"layer.{L}": m.contiguous() for L, m in means.items()}, str(path))
    return make_ablation(
        cfg.ablation.mode, sub, means=means, steer_coef=cfg.ablation.steer_coef, vectors=vectors
    )


def _evaluate(cfg: TrainConfig, prep: Prepared, task: Task, forward: Any, pad_id: int) -> dict[str, Any]:
    """Mean held-out loss (with the training-time ablation) and, for classification, accuracy."""
    import torch

    items: list[Tokenized] = prep.held_out
    bs = cfg.optim.batch_size
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
                total += float(task.loss(output, batch)) * w
                weight += w
                correct += task.correct(output, batch)
                n += len(chunk)
    finally:
        prep.model.train()
    out: dict[str, Any] = {"eval_loss": total / max(weight, 1)}
    if cfg.objective != "chat":
        out["eval_accuracy"] = correct / max(n, 1)
    return out


def _autocast(cfg: TrainConfig, device: torch.device) -> Any:
    import torch

    if cfg.optim.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _progress(cfg: TrainConfig, total: int, start: int) -> Any:
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _fingerprint(cfg: TrainConfig, mcfg: ModelConfig, sub: Subspace | None) -> str:
    import hashlib

    data = cfg.model_dump(mode="json", exclude={*_RESUME_FREE, "model"})
    data["model"] = mcfg.model_dump(mode="json", exclude={"device"})
    data["subspace"] = sub.digest() if sub is not None else None
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _cut_log(log_path: Path, step: int) -> None:
    """Drop log records past the checkpoint we resume from (they will be written again)."""
    if not log_path.exists():
        return
    from caft.rundir import atomic_write_text

    keep = [r for r in read_jsonl(log_path) if int(r.get("step", 0)) <= step and r.get("event") != "stopped"]
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in keep))


def _save_final(prep: Prepared, out: Path) -> Path:
    """Write the adapter (LoRA) or the full model, plus the tokenizer, into `out/final` atomically."""
    from caft.training.classifier import EncoderClassifier

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


def _record(
    cfg: TrainConfig,
    mcfg: ModelConfig,
    prep: Prepared,
    abl: Ablation | None,
    metrics: dict[str, Any],
    total_steps: int,
) -> dict[str, Any]:
    from caft.env import package_versions, scrub_obj

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
                "means_file": MEANS_FILE if abl.mode == "mean" else None,
            },
            "subspace_digest": sub.digest() if sub is not None else None,
            "label_names": prep.label_names,
            "letter_token_ids": prep.letter_ids,
            "steps": total_steps,
            "data": prep.data_report,
            "metrics": metrics,
            "config": cfg.model_dump(mode="json"),
            "model": mcfg.model_dump(mode="json"),
            "versions": package_versions(),
        }
    )
