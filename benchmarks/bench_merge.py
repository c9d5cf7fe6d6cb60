"""Per-candidate TIES merge time: the previous resident path (``fast_ties.ties_merge_fast``, mergekit's argsort
ranks precomputed) versus the fused pass (``evomerge.merge.fused``: thresholds + tie fixups, eager chunks or
torch.compile), next to the memory floor, in one run:

    floor = bytes of (base + deltas read + merged written) / copy bandwidth measured here (read + write)

Two sets of tensors, each in float32 and bfloat16: a synthetic Llama-like one (``--params``) and the real
SmolLM2-135M GGUF (``evomerge.models.tiny.smollm2_gguf_path()``) as the base with 2 "experts" made by perturbing
it (Gaussian deltas of 2% of each tensor's std). Densities are drawn from the 0.001 grid, as a search does; the
old and the fused results are checked bit for bit on every timed candidate.

    python benchmarks/bench_merge.py                       # CPU, 1 thread, both sets, float32 + bfloat16
    python benchmarks/bench_merge.py --device cuda --threads 16

On CUDA the old path ranks with the GPU's argsort, the fused one with mergekit's CPU order (what `evomerge merge`
writes on CPU), so where magnitudes tie the bit-identity line may say False there; the times still compare.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from evomerge.merge.candidate import HeldTensor, merge_gta
from evomerge.merge.fast_ties import MagnitudeThresholds, ties_merge_fast
from evomerge.merge.fused import FusedKernels
from evomerge.merge.registry import resolve_params
from evomerge.merge.thresholds import GridThresholds


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 512 * 2**20) -> float:
    """Bytes moved per second by a large tensor copy (read + write), best of 5."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def layer_shapes(hidden: int) -> list[tuple[int, ...]]:
    """One Llama-style decoder layer: attention (GQA 4:1), MLP 2.75x, two norms."""
    kv, mlp = hidden // 4, int(hidden * 2.75)
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
            (mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]


def synthetic(params: float, hidden: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes, total = [], 0
    while total < params:
        for s in layer_shapes(hidden):
            shapes.append(s)
            total += torch.Size(s).numel()
    return [0.02 * torch.randn(s, generator=g) for s in shapes]


def smollm2() -> list[torch.Tensor]:
    from evomerge.models.sources import open_model
    from evomerge.models.tiny import smollm2_gguf_path

    src = open_model(str(smollm2_gguf_path()))
    return [src.get(name, dtype=torch.float32) for name in src.keys()]


def experts(bases: list[torch.Tensor], n: int, dtype, device: str):
    """Base and n deltas (expert - base, in `dtype`) per tensor, on `device`."""
    g = torch.Generator().manual_seed(1)
    out = []
    for b in bases:
        std = float(b.std()) if b.numel() > 1 else 1.0
        base = b.to(dtype)
        ds = [((b + 0.02 * max(std, 1e-3) * torch.randn(b.shape, generator=g)).to(dtype) - base).to(device)
              for _ in range(n)]
        out.append((base.to(device), ds))
    return out


def timed(fn, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bench(label: str, bases: list[torch.Tensor], dtype, args, bandwidth: float) -> list[str]:
    dev, n = args.device, args.experts
    data = experts(bases, n, dtype, dev)
    numel = sum(b.numel() for b, _ in data)
    rng = random.Random(0)
    weights = [round(rng.uniform(0.3, 1.0), 3) for _ in range(n)]
    outs_old = [torch.empty_like(b) for b, _ in data]
    outs_new = [torch.empty_like(b) for b, _ in data]

    t0 = time.perf_counter()
    old_tables = [[MagnitudeThresholds(d, tie_break="argsort") for d in ds] for _, ds in data]
    build_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    held = [HeldTensor(base=b, deltas=ds, tables=[GridThresholds(d) for d in ds]) for b, ds in data]
    build_new = time.perf_counter() - t0
    tie_bytes = sum(t.nbytes()["ranks"] for h in held for t in h.tables or [])
    rank_bytes = sum(t.ranks.numel() * 4 for ts in old_tables for t in ts if t.ranks is not None)

    candidates = [[rng.randint(100, 900) / 1000 for _ in range(n)] for _ in range(args.repeats + 1)]
    state = {"i": 0}

    def old():
        dens = candidates[state["i"] % len(candidates)]
        for (b, ds), th, o in zip(data, old_tables, outs_old):
            ties_merge_fast(b, ds, th, weights, dens, out=o)

    def fused(kernels):
        def run():
            dens = candidates[state["i"] % len(candidates)]
            params = resolve_params("ties", {"weight": weights, "density": dens}, n)
            for h, o in zip(held, outs_new):
                merge_gta(kernels, o, h, "ties", params, None)
        return run

    rows, same = [], True
    t_old = timed(old, dev, args.repeats)
    results = {}
    for mode in ("eager", "compile"):
        kernels = FusedKernels(mode)
        t0 = time.perf_counter()
        fused(kernels)()  # compile (or warm up)
        sync(dev)
        first = time.perf_counter() - t0
        results[mode] = (timed(fused(kernels), dev, args.repeats), kernels.compile_seconds if mode == "compile"
                         else 0.0, first, kernels.mode)
        for i in range(len(candidates)):  # bit for bit, every candidate
            state["i"] = i
            old()
            fused(kernels)()
            same &= all(torch.equal(a, b) for a, b in zip(outs_old, outs_new))
        state["i"] = 0
    item = torch.empty((), dtype=dtype).element_size()
    floor = numel * item * (2 + n) / bandwidth
    head = f"{label}, {str(dtype).removeprefix('torch.')}, {numel / 1e6:.1f}M params x (base + {n} deltas)"
    rows.append(f"\n{head}: floor {floor:.3f} s ({numel * item * (2 + n) / 1e9:.2f} GB at {bandwidth / 1e9:.1f} GB/s)")
    rows.append(f"  {'path':46s} {'s/candidate':>11s} {'x floor':>8s} {'one-off s':>10s} {'held extra':>11s}")
    rows.append(f"  {'old: ties_merge_fast + argsort ranks':46s} {t_old:11.3f} {t_old / floor:8.1f} "
                f"{build_old:10.1f} {rank_bytes / 2**20:9.1f}MB")
    for mode, (t, comp, first, used) in results.items():
        what = f"fused {used}" + (f" (compile {comp:.1f} s)" if mode == "compile" else "")
        rows.append(f"  {what:46s} {t:11.3f} {t / floor:8.1f} {build_new + (first if mode == 'compile' else 0):10.1f}"
                    f" {tie_bytes / 2**20:9.1f}MB")
    rows.append(f"  bit-identical old == fused on {len(candidates)} candidates: {same}; "
                f"speed-up compiled vs old {t_old / results['compile'][0]:.1f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--params", type=float, default=12e6, help="synthetic set: parameters (default 12M)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3, help="candidates timed (best of)")
    ap.add_argument("--sets", default="synthetic,smollm2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth(args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} thread(s)"
    print(f"TIES per candidate on {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    print("held extra: old = mergekit argsort rank per element; fused = mergekit's order of tied elements only "
          "(+1001 float32 thresholds per delta)")
    sets = {"synthetic": lambda: synthetic(args.params, args.hidden), "smollm2": smollm2}
    for set_name in args.sets.split(","):
        bases = sets[set_name]()
        label = "SmolLM2-135M (GGUF)" if set_name == "smollm2" else f"synthetic (hidden {args.hidden})"
        for dt in args.dtypes.split(","):
            for line in bench(label, bases, getattr(torch, dt), args, bandwidth):
                print(line, flush=True)


if __name__ == "__main__":
    main()
