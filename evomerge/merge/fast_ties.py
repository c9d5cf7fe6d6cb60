"""TIES for the search loop: magnitude trimming by precomputed thresholds.

mergekit's TIES argsorts every task vector on every merge; in a search the deltas
never change, only the densities do. Densities come from a grid (default steps of
0.001), so ``MagnitudeThresholds`` sorts |delta| ONCE per tensor per run and keeps
the magnitude of the k-th largest element for every grid density, with
``k = max(1, int(density * numel))`` exactly as ``methods.magnitude`` counts it.
Trimming is then ``|delta| >= threshold``: an elementwise comparison fused into the
merge pass, no sort per candidate.

How this differs from exact top-k (``methods.ties``): only at ties of equal
magnitude at the threshold. Top-k keeps exactly k elements and breaks ties by
argsort order; ``>= threshold`` keeps every element equal to the k-th largest
magnitude, so it may keep a few more. On float32 deltas with continuous values
there are no such ties and the masks are identical (tests check this at grid
densities). Tied zeros are harmless: a zero delta has no sign, so the sign
election drops it from both sum and divisor either way. With bfloat16 deltas
(few distinct values) extra kept elements are at most the number of elements
sharing the threshold magnitude. Off-grid densities fall back to one
``kthvalue`` (cached), so every density works; grid ones cost nothing.

Device-agnostic: thresholds live on the delta's device; nothing syncs to the host
per candidate (the threshold is a 0-d device tensor).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Optional

import torch

__all__ = ["MagnitudeThresholds", "ties_merge_fast"]


class MagnitudeThresholds:
    """Magnitude thresholds of one delta tensor at every density of a grid.

    Build once per run: one sort of |delta| (float32; float64 for float64 deltas).
    For each grid density with ``k = max(1, int(density*numel))`` it keeps
    ``threshold`` = the k-th largest magnitude and, only when more than k elements
    reach it (ties), a ``cutoff``: elements equal to the threshold are kept only at
    flat index < cutoff. So the mask keeps exactly k elements with the same
    magnitudes as top-k.

    ``tie_break``:
    - ``"index"`` (default): among equal magnitudes at the threshold the lowest flat
      indices win; no memory beyond a few numbers per grid point.
    - ``"argsort"``: store each element's rank in mergekit's own
      ``argsort(|delta|, descending=True)`` (int32, 4 bytes an element) and keep
      ``rank < k``: the very subset mergekit keeps, bit for bit, on the same device
      and torch build. Costs one int32 read per element per merge.

    ``build_device`` lets a huge tensor be sorted elsewhere (e.g. on CPU to spare GPU
    memory); thresholds stay on the delta's device and cutoffs are Python ints, so
    trimming never syncs with the device.
    """

    def __init__(
        self,
        delta: torch.Tensor,
        *,
        steps: int = 1000,
        tie_break: str = "index",
        build_device: Optional[torch.device] = None,
    ):
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if tie_break not in ("index", "argsort"):
            raise ValueError("tie_break must be 'index' or 'argsort'")
        if not delta.is_contiguous():
            raise ValueError("delta must be contiguous (trimming uses flat index ranges)")
        self.delta = delta
        self.numel = n = delta.numel()
        self.steps = steps
        self.tie_break = tie_break
        self.device = delta.device
        self.sort_dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
        self.ranks: Optional[torch.Tensor] = None
        # k for every grid density below 1, exactly as methods.magnitude counts it
        ks = sorted({max(1, int((i / steps) * n)) for i in range(1, steps)}) if n else []
        self._index = {k: i for i, k in enumerate(ks)}
        self._cutoffs: list[Optional[int]] = []
        self.thresholds = torch.empty(0, dtype=self.sort_dtype, device=self.device)
        self._extra: dict[int, tuple[torch.Tensor, Optional[int]]] = {}
        if not ks:
            return
        dev = build_device or delta.device
        if tie_break == "argsort":
            w = delta.detach().abs().reshape(-1).to(dev)
            if w.device.type == "cpu":
                w = w.float()  # exactly mergekit's call, hence its tie order
            perm = torch.argsort(w, descending=True)
            ranks = torch.empty(n, dtype=torch.int32, device=dev)
            ranks[perm] = torch.arange(n, dtype=torch.int32, device=dev)
            self.ranks = ranks.reshape(delta.shape).to(self.device)
            return
        mags = delta.detach().reshape(-1).to(dev).abs().to(self.sort_dtype)
        values, indices = torch.sort(mags, descending=True, stable=True)
        del mags
        pos = torch.tensor([k - 1 for k in ks], device=values.device)
        thr = values[pos]
        count_ge = torch.searchsorted(values.neg(), thr.neg(), right=True)  # elements >= thr
        k_t = torch.tensor(ks, device=values.device)
        # stable sort: tied elements among the first k are those at index <= indices[k-1]
        cut = torch.where(count_ge > k_t, indices[pos] + 1, torch.full_like(pos, -1))
        self.thresholds = thr.to(self.device)
        self._cutoffs = [None if c < 0 else c for c in cut.tolist()]

    def k(self, density: float) -> int:
        """Number of elements top-k keeps at this density (as methods.magnitude)."""
        return max(1, int(density * self.numel))

    def on_grid(self, density: float) -> bool:
        return density >= 1 or density <= 0 or self.tie_break == "argsort" or self.k(density) in self._index

    def threshold(self, density: float) -> Optional[tuple[torch.Tensor, Optional[int]]]:
        """``(threshold, cutoff)`` for this density ("index" mode), or None to keep
        everything (density >= 1). Keep ``|d| > thr``, and ``|d| == thr`` where the
        flat index < cutoff (all of them when cutoff is None); density <= 0 gives
        thr = +inf. Off-grid densities cost one kthvalue, then are cached."""
        if density >= 1:
            return None
        if density <= 0 or self.numel == 0:
            return torch.tensor(float("inf"), dtype=self.sort_dtype, device=self.device), None
        k = self.k(density)
        i = self._index.get(k)
        if i is not None:
            return self.thresholds[i], self._cutoffs[i]
        if k not in self._extra:
            mags = self.delta.detach().reshape(-1).abs().to(self.sort_dtype)
            thr = torch.kthvalue(mags.cpu() if mags.device.type == "mps" else mags, self.numel - k + 1).values
            thr = thr.to(self.device)
            tied = (mags == thr).nonzero().flatten()
            extra = k - int((mags > thr).sum())
            cutoff = None if extra >= tied.numel() else int(tied[extra - 1]) + 1
            self._extra[k] = (thr, cutoff)
        return self._extra[k]

    def trim_(self, x: torch.Tensor, density: float, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Zero, in place, the entries of ``x`` (shaped like the delta) that top-k
        trimming of ``delta`` at ``density`` drops; returns ``x``."""
        if density >= 1:
            return x
        if density <= 0 or self.numel == 0:
            return x.zero_()
        if self.ranks is not None:
            return x.masked_fill_(self.ranks >= self.k(density), 0)
        thr, cutoff = self.threshold(density)
        a = (self.delta if delta is None else delta).abs()
        x.masked_fill_(a < thr, 0)
        if cutoff is not None:  # ties at the threshold beyond k: drop the later ones
            x.view(-1)[cutoff:].masked_fill_(a.view(-1)[cutoff:] == thr, 0)
        return x

    def mask(self, density: float, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Boolean keep-mask (True = kept) of ``delta`` (default: the build tensor)."""
        d = self.delta if delta is None else delta
        return self.trim_(torch.ones_like(d, dtype=torch.bool), density, d)

    def nearest_grid_density(self, density: float) -> float:
        """The grid density closest to ``density`` (for callers that snap genomes)."""
        return min(max(round(density * self.steps), 0), self.steps) / self.steps

    def __repr__(self) -> str:
        return (f"MagnitudeThresholds(numel={self.numel}, steps={self.steps}, "
                f"tie_break={self.tie_break!r}, device={self.device})")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # mergekit sums bf16/fp16 stacks with torch.sum, which accumulates in float32
    # and rounds once; accumulate the same way so results agree to rounding.
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def ties_merge_fast(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    thresholds: Sequence[MagnitudeThresholds],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """TIES merge of precomputed ``deltas`` (model - base, in the base's dtype).

    Same maths as ``methods.ties`` (sign election by the sum of weighted trimmed
    deltas, >= 0 is +; disjoint mean with zero divisor -> 1 when ``normalize``;
    ``* lambda_``; ``+ base``), but trimming is ``|delta| >= threshold`` and the
    model axis is streamed: two passes over the deltas, no stacked copy, no sort.
    Writes into ``out`` (e.g. the live model's parameter) when given; ``out`` may be
    ``base`` itself only if the caller does not need the base afterwards.
    """
    n = len(deltas)
    if not (len(thresholds) == len(weights) == len(densities) == n):
        raise ValueError("deltas, thresholds, weights and densities must align")
    dtype = base.dtype
    acc = _acc_dtype(dtype)

    def trimmed(i: int) -> Optional[torch.Tensor]:
        """w_i * trim(delta_i) in the working dtype (mergekit: trim, then * w)."""
        if densities[i] <= 0 or weights[i] == 0:
            return None
        d = deltas[i]
        w = torch.tensor(weights[i], dtype=dtype, device=d.device)  # mergekit casts w to dtype
        return thresholds[i].trim_(d * w, densities[i], d)

    # pass 1: elected sign = sign of the sum of weighted trimmed deltas
    sign_weight = torch.zeros(base.shape, dtype=acc, device=base.device)
    for i in range(n):
        wd = trimmed(i)
        if wd is not None:
            sign_weight.add_(wd)
    # compare after rounding to the working dtype, as mergekit's dtype-typed sum does
    positive = sign_weight.to(dtype) >= 0
    del sign_weight

    # pass 2: disjoint sum over agreeing entries, and their weight sum
    mixed = torch.zeros(base.shape, dtype=acc, device=base.device)
    divisor = torch.zeros(base.shape, dtype=acc, device=base.device) if normalize else None
    for i in range(n):
        wd = trimmed(i)
        if wd is None:
            continue
        agree = torch.where(positive, wd > 0, wd < 0)
        mixed.add_(wd.masked_fill_(~agree, 0))
        if divisor is not None:
            w = torch.tensor(weights[i], dtype=dtype, device=base.device)
            divisor.add_(agree.to(dtype) * w)
    mixed = mixed.to(dtype)
    if divisor is not None:
        divisor = divisor.to(dtype)
        divisor.masked_fill_(divisor == 0, 1)
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    if out is None:
        return (base + mixed).to(dtype)
    torch.add(base, mixed, out=out) if out.dtype == dtype else out.copy_(base + mixed)
    return out
