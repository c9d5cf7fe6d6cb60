"""Per-candidate TIES merge time: mergekit-style (argsort every merge, ``methods.ties``)
versus ``fast_ties`` (thresholds precomputed once per run).

Builds a model-sized set of random tensors (Llama-like layer shapes) for a base and
N experts, then merges them at densities drawn from the 0.001 grid, as a search
would. Prints a table; on CUDA (or when --bandwidth-gbs is given) also the
memory-bandwidth floor: (base + deltas read + merged written) / bandwidth.

    python benchmarks/bench_merge.py                    # CPU, 3 experts x 13M params
    python benchmarks/bench_merge.py --device cuda --params 2e9 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from evomerge.merge.fast_ties import MagnitudeThresholds, ties_merge_fast
from evomerge.merge.registry import merge_tensor


def layer_shapes(hidden: int) -> list[tuple[int, ...]]:
    """One Llama-style decoder layer: attention (GQA 4:1), MLP 2.75x, two norms."""
    kv, mlp = hidden // 4, int(hidden * 2.75)
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
            (mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]


def build(params: float, hidden: int, experts: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes, total = [], 0
    while total < params:
        for s in layer_shapes(hidden):
            shapes.append(s)
            total += torch.Size(s).numel()
    bases, deltas = [], []
    for s in shapes:
        b = (0.02 * torch.randn(s, generator=g)).to(dtype)
        ds = [((b.float() + 1e-3 * torch.randn(s, generator=g)).to(dtype) - b) for _ in range(experts)]
        bases.append(b.to(device))
        deltas.append([d.to(device) for d in ds])
    return bases, deltas, total


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=12e6,
                    help="parameters per model (default 12M: 2 layers at hidden 768)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=3, help="candidates timed for the fast paths")
    ap.add_argument("--mergekit-repeats", type=int, default=1, help="candidates timed for argsort TIES")
    ap.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="memory bandwidth for the floor (default 3000 on CUDA, none on CPU)")
    ap.add_argument("--no-argsort-ranks", action="store_true", help="skip the tie_break='argsort' row")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = args.device
    bases, deltas, total = build(args.params, args.hidden, args.experts, dtype, dev)
    rng = random.Random(0)
    weights = [round(rng.uniform(0.3, 1.0), 3) for _ in range(args.experts)]

    def densities():
        return [rng.randint(100, 900) / 1000 for _ in range(args.experts)]

    models = [[b + d for d in ds] for b, ds in zip(bases, deltas)]
    outs = [torch.empty_like(b) for b in bases]

    def mergekit_style():
        dens = densities()
        for b, ms in zip(bases, models):
            merge_tensor("ties", b, ms, {"weight": weights, "density": dens})

    t0 = time.perf_counter()
    thr = [[MagnitudeThresholds(d) for d in ds] for ds in deltas]
    sync(dev)
    build_index = time.perf_counter() - t0

    def fast(thresholds):
        def run():
            dens = densities()
            for b, ds, th, o in zip(bases, deltas, thresholds, outs):
                ties_merge_fast(b, ds, th, weights, dens, out=o)
        return run

    rows = [("mergekit-style (argsort per merge)",
             timed(mergekit_style, dev, args.mergekit_repeats, warmup=dev.startswith("cuda")), None)]
    rows.append(("fast_ties, tie_break=index", timed(fast(thr), dev, args.repeats), build_index))
    del thr
    if not args.no_argsort_ranks:
        t0 = time.perf_counter()
        thr = [[MagnitudeThresholds(d, tie_break="argsort") for d in ds] for ds in deltas]
        sync(dev)
        build_rank = time.perf_counter() - t0
        rows.append(("fast_ties, tie_break=argsort (ranks)", timed(fast(thr), dev, args.repeats), build_rank))

    item = torch.tensor([], dtype=dtype).element_size()
    moved = total * item * (1 + args.experts + 1)  # base + deltas read, merged written
    bw = args.bandwidth_gbs if args.bandwidth_gbs is not None else (3000.0 if dev.startswith("cuda") else None)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU, {args.threads} thread(s)"
    print(f"TIES per candidate: {args.experts} experts x {total / 1e6:.1f}M params, {args.dtype}, "
          f"{len(bases)} tensors, {name}")
    print(f"{'method':40s} {'s/candidate':>12s} {'vs mergekit':>12s} {'one-off build s':>16s}")
    ref = rows[0][1]
    for label, t, b in rows:
        print(f"{label:40s} {t:12.4f} {ref / t:11.1f}x {'' if b is None else f'{b:16.3f}'}")
    if bw:
        floor = moved / (bw * 1e9)
        print(f"{'memory floor (' + f'{moved / 1e9:.2f} GB at {bw:g} GB/s' + ')':40s} {floor:12.4f}"
              f"   fast_ties is {rows[1][1] / floor:.1f}x the floor")


if __name__ == "__main__":
    main()
