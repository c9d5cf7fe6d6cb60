"""One candidate's merge of one tensor from what the resident merger holds (base + deltas, or the sources).

The task-arithmetic family is mergekit's ``generalized_task_arithmetic`` from the point where it has computed
``delta = model - base`` (held once per run, so bit-identical by construction), then:

- sparsify, as mergekit does and in its order (one generator per tensor, models in order): TIES on a grid
  density = a threshold per model passed to the fused kernel, plus the tied positions mergekit drops
  (``thresholds.GridThresholds``) redone after the kernel on a gather of those few positions; DARE = the
  generator's Bernoulli draw first (the very call mergekit makes, so the same mask), the masked delta and its L1
  norm by torch, then the kernel; DELLA = the same from its precomputed rank table; breadcrumbs and off-grid TIES
  densities = mergekit's sort (exact, slower);
- the rest (weights, sign election, disjoint mean, lambda, + base) in one fused pass into the live parameter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge import methods
from evomerge.merge.fused import F32, FusedKernels, gta_eager
from evomerge.merge.registry import GTA_METHODS
from evomerge.merge.thresholds import GridThresholds, TrimSpec

EPS = 1e-7  # methods.rescaled_masked_tensor's default


def work_dtype(delta: torch.Tensor) -> torch.dtype:
    """mergekit's DARE/DELLA work dtype: float32 for CPU tensors other than bfloat16."""
    return delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 else F32


def della_rank_table(delta: torch.Tensor) -> torch.Tensor:
    """``rank_norm`` of ``methods.della_magprune`` (rows of the 2-D view, in its work dtype): constant per delta."""
    work = work_dtype(delta)
    t = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    sorted_indices = torch.argsort(t.abs(), dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(work) + 1
    del sorted_indices
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    return ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)


@dataclass
class HeldTensor:
    """What is held for one output tensor (on the merge device, or on the host when offloaded)."""

    base: torch.Tensor | None = None
    deltas: list[torch.Tensor] | None = None
    sources: list[torch.Tensor] | None = None
    tables: list[GridThresholds] | None = None  # TIES
    della: list[torch.Tensor] | None = None  # DELLA rank tables
    l1: list[float] | None = None  # |delta|_1 in the work dtype (DARE/DELLA rescale), constant per delta


def _rescale(x: torch.Tensor, before: torch.Tensor) -> float:
    """methods.rescaled_masked_tensor's L1 factor for the masked `x`, as the float it multiplies by (1: none)."""
    after = x.abs().sum()
    if before < EPS or after < EPS:
        return 1.0
    return float(before / after)


def _l1(delta: torch.Tensor) -> float:
    return float(delta.to(work_dtype(delta)).abs().sum())


def merge_gta(kernels: FusedKernels, out: torch.Tensor, held: HeldTensor, method: str, params: dict[str, Any],
              generator: torch.Generator | None) -> bool:
    """Write the merge of `held` into `out`; `params` as ``registry.resolve_params`` returns them.
    Returns True when every merged value is finite."""
    sparsification, consensus = GTA_METHODS[method]
    base, deltas = held.base, held.deltas
    assert base is not None and deltas is not None
    n = len(deltas)
    dtype = base.dtype
    weights, densities = params["weight"], params.get("density", [1.0] * n)
    rescale = bool(params.get("rescale", False))
    w_cast, divisor = _weights(tuple(weights), dtype, base.dim())
    scaled = params["lambda"] != 1  # mergekit: `if lambda_ != 1: mixed *= lambda_`
    tail = [float(params["lambda"]), divisor]  # p = weights, thresholds, rescales, lambda, divisor

    specs: list[TrimSpec | None] = []
    if sparsification == "magnitude" and not rescale and held.tables is not None:
        specs = [t.lookup(d) for t, d in zip(held.tables, densities)]
    work = dtype
    uniform = len({s is not None and s.ranks is not None for s in specs}) == 1  # the holdings make it so
    if specs and all(s is not None for s in specs) and uniform:  # TIES on the grid: trim inside the kernel
        trim = [spec for spec in specs if spec is not None]
        for spec in trim:  # host-held tie data (offload): to the merge device
            if spec.fixup is not None and spec.fixup.device != base.device:
                spec.fixup = spec.fixup.to(base.device, non_blocking=True)
            if spec.ranks is not None and spec.ranks.device != base.device:
                spec.ranks = spec.ranks.to(base.device, non_blocking=True)
        p = torch.tensor(w_cast + [spec.threshold for spec in trim] + [1.0] * n + tail, dtype=F32,
                         device=base.device)
        cut, ranks = None, None
        if all(spec.ranks is not None for spec in trim):  # dense rank tables: keep rank < k
            ranks = [spec.ranks for spec in trim if spec.ranks is not None]
            cut = torch.tensor([spec.k for spec in trim], device=base.device)
        elif any(spec.cutoff is not None for spec in trim):
            cut = torch.tensor([base.numel() if spec.cutoff is None else spec.cutoff for spec in trim],
                               device=base.device)
        finite = kernels.gta(out, base, deltas, p, cut, ranks, trim=True, consensus=consensus is not None,
                             normalize=params["normalize"], scaled=scaled, work=dtype)
        if any(spec.fixup is not None for spec in trim):
            finite &= _fixup(kernels, out, base, deltas, trim, p, consensus is not None, params["normalize"], scaled)
        return finite

    xs: list[torch.Tensor] = []
    scales: list[float] = []
    for i, delta in enumerate(deltas):
        x, scale = _sparsify(held, i, delta, densities[i], sparsification, params, rescale, generator)
        xs.append(x)
        scales.append(scale)
        if x.dtype != dtype:
            work = x.dtype
    p = torch.tensor(w_cast + [0.0] * n + scales + tail, dtype=F32, device=base.device)
    return kernels.gta(out, base, xs, p, None, trim=False, consensus=consensus is not None,
                       normalize=params["normalize"], scaled=scaled, work=work)


@functools.lru_cache(maxsize=4096)
def _weights(weights: tuple[float, ...], dtype: torch.dtype, ndim: int) -> tuple[list[float], float]:
    """The weights as mergekit uses them (cast to the working dtype) and its divisor without consensus
    (``w.sum(dim=0)`` of the weights shaped [n, 1, ...], |.| < 1e-8 -> 1), as floats."""
    w = torch.tensor(weights, dtype=dtype)
    divisor = w.reshape(len(weights), *[1] * ndim).sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return w.tolist(), float(divisor.reshape(-1)[0])


def _sparsify(held: HeldTensor, i: int, delta: torch.Tensor, density: float, how: str | None,
              params: dict[str, Any], rescale: bool, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
    """mergekit's sparsified delta i, split as (masked delta in the work dtype, rescale factor)."""
    norm = "l1" if rescale else None
    if how is None or density >= 1:
        return delta, 1.0
    if how == "magnitude":
        return methods.magnitude(delta, density, norm), 1.0
    if how == "magnitude_outliers":
        gammas = params.get("gamma") or [None] * len(params["weight"])
        gamma = 0.01 if gammas[i] is None else gammas[i]
        return methods.magnitude_outliers(delta, density, norm, gamma=gamma), 1.0
    work = work_dtype(delta)
    if how == "random":
        mask = torch.bernoulli(torch.full_like(delta, fill_value=density, dtype=work), generator=generator)
        x = mask.mul_(delta.to(work))  # delta * mask, in place in the mask
    elif how == "della_magprune":
        if density <= 0:
            return torch.zeros_like(delta), 1.0
        eps = params["epsilon"][i]
        table = held.della[i] if held.della is not None else della_rank_table(delta)
        probs = (density - eps) + table * 2 * eps
        mask = torch.bernoulli(probs, generator=generator).to(work)
        del probs
        x = mask.mul_(delta.to(work).reshape(mask.shape)).reshape(delta.shape)
    else:
        raise ValueError(f"unknown sparsification {how!r}")
    if not rescale:
        return x, 1.0
    before = held.l1[i] if held.l1 is not None else _l1(delta)
    return x, _rescale(x, torch.tensor(before, dtype=work, device=x.device))


def _fixup(kernels: FusedKernels, out: torch.Tensor, base: torch.Tensor, deltas: list[torch.Tensor],
           specs: list[TrimSpec], p: torch.Tensor, consensus: bool, normalize: bool, scaled: bool) -> bool:
    """Redo, with mergekit's choice among tied magnitudes, the positions where the threshold kept too many.

    Positions may repeat (tied for several models): they are merged alike and written alike. Which of them a
    model drops is looked up in a reusable flag buffer (set, read, cleared: work proportional to the fixups)."""
    pos = torch.cat([s.fixup for s in specs if s.fixup is not None]).long()
    flags = kernels.flags(out.numel(), out.device)
    xs = []
    for s, delta in zip(specs, deltas):
        d = delta.reshape(-1).index_select(0, pos)
        drop = d.abs().to(F32) < s.threshold
        if s.fixup is not None:
            idx = s.fixup.long()
            flags.index_fill_(0, idx, True)
            drop |= flags.index_select(0, pos)
            flags.index_fill_(0, idx, False)
        xs.append(d.masked_fill_(drop, 0))
    res = torch.empty(pos.numel(), dtype=out.dtype, device=out.device)
    finite = gta_eager(res, base.reshape(-1).index_select(0, pos), xs, p, None, None, 0, False, consensus,
                       normalize, scaled, out.dtype)
    out.view(-1).index_copy_(0, pos, res)
    return bool(finite)


def merge_linear(kernels: FusedKernels, out: torch.Tensor, sources: list[torch.Tensor],
                 params: dict[str, Any]) -> bool:
    """mergekit's linear (float32 maths; a near-zero weight sum divides by 1) into `out`."""
    w = torch.tensor(list(params["weight"]), dtype=F32)
    denominator = w.sum()
    if denominator.abs() < 1e-8:
        denominator = torch.ones_like(denominator)
    p = torch.cat([w, denominator.reshape(1)]).to(out.device)
    return kernels.linear(out, sources, p, normalize=params["normalize"])
