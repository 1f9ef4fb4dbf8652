"""Throughput and memory of the interp passes on a tiny model, side by side with plain forward passes.

    python benchmarks/interp_throughput.py                 # CPU, defaults below
    python benchmarks/interp_throughput.py --device cuda --hidden 512 --layers 12 --tokens 200000
    CAFT_CACHE_DIR=/work/cache nice python benchmarks/interp_throughput.py --model gemma-3-270m --tokens 1024 --repeats 1

(a) collection + streaming PCA vs two plain forward passes (base + fine-tuned) over the same tokens;
    target: throughput ratio >= 0.85. Shown for the default layers (1/4, 1/2, 3/4 depth: the forward
    stops after the deepest one) and with the last layer included (no early stop).
(b) peak memory of collection + PCA at N and 10 N tokens, each in a fresh process; target: flat (<= 1.10).
(c) the evidence corpus pass for 200 candidates vs one plain forward pass over the corpus; target <= 1.3x.

Timings are the best of `--repeats` runs, measurements interleaved, so that a noisy shared machine hurts
each side alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")  # per-batch progress bars would be timed too


def build(args: argparse.Namespace, n_tokens: int) -> tuple[Any, Any]:
    """An ActivationSource over two tiny llamas (same shape, other weights) and lazily padded batches."""
    import torch

    from caft.config import ModelConfig
    from caft.interp.inputs import Example, make_batches
    from caft.interp.source import ActivationSource
    from caft.models import LoadedModel
    from caft.sites import Sites
    from caft.testing import tiny_model, tiny_tokenizer

    dev = torch.device(args.device)
    tok = tiny_tokenizer()
    loaded = []
    for seed in (0, 1):
        if args.model:
            from caft.models import load_model

            lm = load_model(ModelConfig(name_or_path=args.model, device=args.device, dtype="float32"))
            if seed:  # a stand-in "fine-tuned" model: the same weights, slightly perturbed
                gen = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    for p in lm.model.parameters():
                        p.add_(torch.randn(p.shape, generator=gen).to(p.device) * 1e-3 * p.std())
            loaded.append(lm)
            continue
        m = tiny_model("llama", seed=seed, hidden=args.hidden, layers=args.layers).to(dev)
        loaded.append(
            LoadedModel(m, tok, Sites.of(m), dev, torch.float32, ModelConfig(name_or_path=f"tiny{seed}"))
        )
    source = ActivationSource(loaded[0], loaded[1])
    g = torch.Generator().manual_seed(0)
    n_docs = max(1, n_tokens // args.seq)
    ids = torch.randint(10, 400, (n_docs, args.seq), generator=g).tolist()
    half = args.seq // 2
    examples = [Example(f"d:{i}", row, [j >= half for j in range(args.seq)]) for i, row in enumerate(ids)]
    return source, make_batches(examples, args.batch, 0)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def per_batch_best(
    fns: dict[str, Callable[[Any], Any]], batches: Any, repeats: int, device: str
) -> dict[str, float]:
    """Sum over batches of the best (min over repeats) time of each function on that batch. Functions run
    interleaved batch by batch, in rotating order, so that load spikes on a shared machine hit all alike."""
    names = list(fns)
    best = {k: [math.inf] * len(batches) for k in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for i in range(len(batches)):
            b = batches[i]
            for k in order:
                sync(device)
                t = time.perf_counter()
                fns[k](b)
                sync(device)
                best[k][i] = min(best[k][i], time.perf_counter() - t)
    return {k: sum(v) for k, v in best.items()}


def plain(source: Any, which: tuple[str, ...], device: str) -> Callable[[Any], None]:
    import torch

    def run(b: Any) -> None:
        with torch.no_grad():
            ids, att = b.input_ids.to(device), b.attention_mask.to(device)
            for w in which:
                source.loaded(w).model(input_ids=ids, attention_mask=att)

    return run


def collect_pca(source: Any, layers: list[int]) -> tuple[Callable[[Any], None], Any]:
    """Collection + streaming PCA update for one batch (the moments persist across calls)."""
    from caft.interp.collect import collect_diffs
    from caft.interp.pca import StreamingDiffPCA

    pca = StreamingDiffPCA(layers, source.sites.d_model, source.device)

    def run(b: Any) -> None:
        for db in collect_diffs(source, [b], layers):
            for layer in layers:
                pca.update(layer, db.diffs[layer])

    return run, pca


def evidence(source: Any, layers: list[int], n_cands: int) -> Callable[[Any], None]:
    """The evidence corpus pass (projections on all candidates + streaming top-k) for one batch."""
    import torch

    from caft.interp.config import EvidenceConfig
    from caft.interp.evidence_passes import corpus_pass, group_by_layer
    from caft.interp.schema import Candidate

    g = torch.Generator().manual_seed(1)
    d = source.sites.d_model
    cands = [Candidate(id=f"pc:L{layers[i % len(layers)]}:{i}", kind="pc", layer=layers[i % len(layers)], index=i)
             for i in range(n_cands)]  # fmt: skip
    dirs = {c.id: torch.randn(d, generator=g) for c in cands}
    groups = group_by_layer(cands, dirs, d, source.sites.n_layers)
    cfg = EvidenceConfig(top_k=20, window=16)

    def run(b: Any) -> None:
        corpus_pass(source, groups, [b], cfg, None, None)

    return run


def collect_pca_total(source: Any, batches: Any, layers: list[int], k: int = 20) -> None:
    run, pca = collect_pca(source, layers)
    for b in batches:
        run(b)
    for layer in layers:
        pca.result(layer, k)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_memory(args: argparse.Namespace) -> None:
    """Run collection + PCA once at `--tokens` and print peak memory (fresh process): the process peak RSS,
    and the peak of current RSS during the pass (sampled every 2 ms) above the RSS just before it."""
    import threading

    import torch

    from caft.interp.source import default_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    source, batches = build(args, args.tokens)
    layers = default_layers(args.layers)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mb()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    collect_pca_total(source, batches, layers)
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_mb())
    out = {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pass_rss_increase_mb": peak[0] - before,
    }
    if args.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def run_child(args: argparse.Namespace, tokens: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child-memory", "--tokens", str(tokens), "--device", args.device,
           "--threads", str(args.threads or 0),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--seq", str(args.seq),
           "--batch", str(args.batch), *(["--model", args.model] if args.model else [])]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    last: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    return last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="a real model (built-in name such as gemma-3-270m, or a folder) instead"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model:  # the real model's depth and width replace --layers / --hidden
        from transformers import AutoConfig

        from caft.builtin_models import resolve_model_path

        mcfg: Any = AutoConfig.from_pretrained(resolve_model_path(args.model))
        args.layers, args.hidden = int(mcfg.num_hidden_layers), int(mcfg.hidden_size)
    if args.child_memory:
        child_memory(args)
        return

    import torch

    from caft.interp.source import default_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    source, batches = build(args, args.tokens)
    layers = default_layers(args.layers)
    with_last = sorted({*layers, args.layers - 1})
    n_tok = sum(b.input_ids.numel() for b in batches)
    print(f"{args.model or 'tiny llama'} d={args.hidden} layers={args.layers} | {n_tok} tokens in {len(batches)} batches | "
          f"device {args.device} | torch threads {torch.get_num_threads()} | best of {args.repeats}")  # fmt: skip
    pca_run, pca = collect_pca(source, layers)
    pca_last_run, _ = collect_pca(source, with_last)
    fns = {
        "two": plain(source, ("base", "ft"), args.device),
        "pca": pca_run,
        "pca_last": pca_last_run,
        "one": plain(source, ("base",), args.device),
        "ev": evidence(source, layers, args.candidates),
        "ev_last": evidence(source, with_last, args.candidates),
    }
    for f in fns.values():  # warm up every path once
        f(batches[0])
    best = per_batch_best(fns, batches, args.repeats, args.device)
    eigh = math.inf
    for _ in range(args.repeats):
        t = time.perf_counter()
        for layer in layers:
            pca.result(layer, 20)
        eigh = min(eigh, time.perf_counter() - t)
    best["pca"] += eigh
    best["pca_last"] += eigh * len(with_last) / len(layers)

    print("\n(a) collection + streaming PCA vs two plain forwards (throughput ratio, target >= 0.85)")
    print(f"    two plain forwards              {best['two']:.3f} s  ({n_tok / best['two']:.0f} tok/s)")
    for key, lay in (("pca", layers), ("pca_last", with_last)):
        print(f"    collect+PCA layers {lay!s:<12} {best[key]:.3f} s  ratio {best['two'] / best[key]:.2f}")

    small, large = args.tokens, args.tokens * 10
    m1, m10 = run_child(args, small), run_child(args, large)
    key = "cuda_peak_mb" if "cuda_peak_mb" in m1 else "peak_rss_mb"
    print(f"\n(b) peak memory of collection + PCA ({key}), target: 10x tokens within 10%")
    inc = "pass_rss_increase_mb"
    print(f"    {small:>9} tokens  {m1[key]:.1f} MB  (RSS growth during the pass {m1[inc]:.1f} MB)")
    print(f"    {large:>9} tokens  {m10[key]:.1f} MB  (RSS growth during the pass {m10[inc]:.1f} MB)"
          f"   ratio {m10[key] / m1[key]:.3f}")  # fmt: skip

    print(
        f"\n(c) evidence corpus pass for {args.candidates} candidates vs one plain forward (target <= 1.3x)"
    )
    print(f"    one plain forward               {best['one']:.3f} s")
    for key, lay in (("ev", layers), ("ev_last", with_last)):
        print(f"    evidence layers {lay!s:<15} {best[key]:.3f} s  ratio {best[key] / best['one']:.2f}x")


if __name__ == "__main__":
    main()
