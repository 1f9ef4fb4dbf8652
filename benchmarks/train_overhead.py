"""Overhead of concept ablation during training: plain fine-tuning vs CAFT (`project`), side by side.

Both variants run the trainer's own pieces (the chat loss, the nnsight ablated forward, backward, gradient
clipping, AdamW) on identical randomly initialized models and identical batches. Timing interleaves the two
variants step by step (A B B A ...) so that drift on a shared machine hits both alike, and compares medians.

Memory:
  * cuda: torch.cuda.max_memory_allocated over training steps, one variant on the device at a time;
  * cpu:  each variant in a fresh child process (all imports done, glibc mmap threshold fixed at 64 KiB so
          RSS follows live tensors), peak RSS (psutil, sampled every 0.5 ms) above the RSS just before the
          model is built: params + grads + AdamW state + activations;
  * both: bytes autograd keeps for backward in one step (saved-tensor hooks, unique storages): the
          deterministic part of the activation memory.

    python benchmarks/train_overhead.py                         # hidden 256, 4 layers, seq 128, batch 8
    python benchmarks/train_overhead.py --device cuda --shape qwen2.5-0.5b --steps 30
    CAFT_CACHE_DIR=/work/cache nice python benchmarks/train_overhead.py --model gemma-3-270m --batch 2 --seq 64 --steps 3 --warmup 1

Targets: time ratio <= 1.03, memory ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES: dict[str, dict[str, Any]] = {
    # the CPU shape
    "tiny": {"arch": "llama", "hidden": 256, "layers": 4, "vocab_size": 400},
    # Qwen2.5-0.5B's shape, random weights
    "qwen2.5-0.5b": {
        "arch": "qwen2",
        "hidden": 896,
        "layers": 24,
        "vocab_size": 151936,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}


def build(args: argparse.Namespace, caft: bool) -> dict[str, Any]:
    """Model, optimizer, ablation and a step function for one variant."""
    import torch

    from caft.sites import Sites
    from caft.testing import tiny_model
    from caft.training.ablation import make_ablation, random_subspace
    from caft.training.forward import ablated_forward, wrap
    from caft.training.objectives import ObjectiveLoss

    model: Any
    if args.model:
        from caft.config import ModelConfig
        from caft.models import load_model

        model = load_model(ModelConfig(name_or_path=args.model, device="cpu", dtype="float32")).model
    else:
        shape = dict(SHAPES[args.shape])
        arch = shape.pop("arch")
        hidden, layers = shape.pop("hidden"), shape.pop("layers")
        model = tiny_model(arch, seed=0, hidden=hidden, layers=layers, **shape)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model.to(device=device, dtype=dtype)
    model.train()
    sites = Sites.of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    task = ObjectiveLoss("chat")
    abl = None
    nn_model = None
    if caft:
        n = sites.n_layers
        picks = sorted({max(0, min(n - 1, round(n * f))) for f in (0.25, 0.5, 0.75)})
        spec = ",".join(f"{L}:{args.k}" for L in picks)
        abl = make_ablation("project", random_subspace(spec, sites.d_model, seed=0, n_layers=n))
        nn_model = wrap(model)

    def step(batch: dict[str, Any]) -> float:
        if abl is not None:
            out = ablated_forward(nn_model, sites, abl, batch)
        else:
            out = model(**batch)
        loss = task.loss(out, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return {"model": model, "opt": opt, "step": step, "abl": abl, "device": device}


def vocab_size(args: argparse.Namespace) -> int:
    if args.model:
        from transformers import AutoConfig

        from caft.builtin_models import resolve_model_path

        cfg: Any = AutoConfig.from_pretrained(resolve_model_path(args.model))
        return int(getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size)
    return int(SHAPES[args.shape]["vocab_size"])


def batches(args: argparse.Namespace, vocab: int, n: int) -> list[dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (args.batch, args.seq), generator=gen)
        labels = ids.clone()
        labels[:, : args.seq // 4] = -100  # a prompt part with no loss, as in chat SFT
        mask = torch.ones_like(ids)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(v: dict[str, Any], batch: dict[str, Any]) -> int:
    """Bytes of unique storages autograd saves for backward during one training step."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v["step"](batch)
    return sum(seen.values())


def memory_child(args: argparse.Namespace, caft: bool) -> dict[str, Any]:
    """Peak memory of one variant (run in a fresh process on CPU, or alone on the GPU)."""
    import psutil
    import torch

    import caft.training.forward

    vocab = vocab_size(args)
    data = batches(args, vocab, 3)
    device = torch.device(args.device)
    gc.collect()
    proc = psutil.Process()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = proc.memory_info().rss
    peak = {"rss": base_rss}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    v = build(args, caft)
    for b in data:
        v["step"](to_device(b, device))
    sync(device)
    stop.set()
    sampler.join()
    result: dict[str, Any] = {"rss_peak_delta": peak["rss"] - base_rss}
    if device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated(device) - base
    result["saved_for_backward"] = saved_bytes(v, to_device(data[0], device))
    del v
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, caft in (("plain", False), ("caft", True)):
        if args.device == "cpu":
            cmd = [sys.executable, __file__, *sys.argv[1:], "--memory-child", name]
            # a fixed mmap threshold makes glibc map every large tensor on its own and unmap it when
            # freed, so RSS follows the live tensors instead of the allocator's free lists
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            out[name] = json.loads(res.stdout.strip().splitlines()[-1])
        else:
            out[name] = memory_child(args, caft)
    return out


def measure_time(args: argparse.Namespace) -> dict[str, list[float]]:
    import torch

    torch.manual_seed(0)
    variants = {"plain": build(args, False), "caft": build(args, True)}
    device = variants["plain"]["device"]
    vocab = vocab_size(args)
    data = [to_device(b, device) for b in batches(args, vocab, 4)]
    for i in range(args.warmup):
        for v in variants.values():
            v["step"](data[i % len(data)])
    sync(device)
    times: dict[str, list[float]] = {"plain": [], "caft": [], "plain_cpu": [], "caft_cpu": []}
    for i in range(args.steps):
        order = ["plain", "caft"] if i % 2 == 0 else ["caft", "plain"]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            variants[name]["step"](data[i % len(data)])
            sync(device)
            times[name].append(time.perf_counter() - t0)
            times[name + "_cpu"].append(time.process_time() - c0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument(
        "--model",
        default=None,
        help="a real model instead of --shape: a built-in name (gemma-3-270m) or a local folder (pretrained weights)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=20, help="directions per ablated layer (3 layers)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); one thread keeps timings steady on a shared machine",
    )
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--memory-child", choices=["plain", "caft"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args, args.memory_child == "caft")))
        return

    mem = measure_memory(args)
    times = measure_time(args)
    med = {k: statistics.median(v) for k, v in times.items()}
    # on a CPU the process CPU time of a step is the work it does; wall time also counts the waits for
    # cores that other processes hold. On a GPU the wall time (after synchronize) is the measure.
    on_cpu = not args.device.startswith("cuda")
    sfx = "_cpu" if on_cpu else ""
    time_ratio = med["caft" + sfx] / med["plain" + sfx]
    wall_ratio = med["caft"] / med["plain"]
    # steps run in adjacent pairs, so the median of per-pair ratios cancels slow drift in machine load
    paired = statistics.median(c / p for c, p in zip(times["caft" + sfx], times["plain" + sfx], strict=True))
    mem_key = "cuda_peak" if args.device.startswith("cuda") else "rss_peak_delta"
    mem_ratio = mem["caft"][mem_key] / max(mem["plain"][mem_key], 1)
    saved_ratio = mem["caft"]["saved_for_backward"] / max(mem["plain"]["saved_for_backward"], 1)
    mib = 1024**2
    dev = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"train overhead: shape={args.model or args.shape} device={dev} dtype={args.dtype} batch={args.batch} seq={args.seq} "
        f"CAFT=project, 3 layers, k={args.k}; {args.steps} timed steps per variant after {args.warmup} warm-up"
    )
    print(f"{'':24}{'plain':>14}{'caft':>14}{'ratio':>10}{'target':>10}")
    if on_cpu:
        print(
            f"{'median step CPU (ms)':24}{med['plain_cpu'] * 1e3:14.2f}{med['caft_cpu'] * 1e3:14.2f}"
            f"{time_ratio:10.3f}{'<= 1.03':>10}"
        )
    print(
        f"{'median step wall (ms)':24}{med['plain'] * 1e3:14.2f}{med['caft'] * 1e3:14.2f}{wall_ratio:10.3f}"
        f"{'' if on_cpu else '<= 1.03':>10}"
    )
    print(f"{'median paired ratio':24}{'':28}{paired:10.3f}")
    label = "peak cuda alloc (MiB)" if mem_key == "cuda_peak" else "peak RSS delta (MiB)"
    print(
        f"{label:24}{mem['plain'][mem_key] / mib:14.1f}{mem['caft'][mem_key] / mib:14.1f}{mem_ratio:10.3f}{'<= 1.05':>10}"
    )
    print(
        f"{'saved for bwd (MiB)':24}{mem['plain']['saved_for_backward'] / mib:14.1f}"
        f"{mem['caft']['saved_for_backward'] / mib:14.1f}{saved_ratio:10.3f}"
    )
    q = {k: statistics.quantiles(v, n=4) for k, v in times.items()}
    print(
        "step-time quartiles q1 / q3 (ms): "
        + "; ".join(f"{k}: {q[k][0] * 1e3:.1f} / {q[k][2] * 1e3:.1f}" for k in sorted(q))
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "args": vars(args),
                    "device": dev,
                    "median_step_s": med,
                    "time_ratio": time_ratio,
                    "time_metric": "process_cpu_time" if on_cpu else "wall",
                    "wall_ratio": wall_ratio,
                    "paired_time_ratio": paired,
                    "memory": mem,
                    "memory_metric": mem_key,
                    "memory_ratio": mem_ratio,
                    "saved_for_backward_ratio": saved_ratio,
                    "step_times_s": times,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
