"""TIES by precomputed magnitude thresholds, unfused (the resident merger's previous path).

The search now uses ``evomerge.merge.thresholds`` (a threshold per grid density, mergekit's order only where
magnitudes tie) and the fused pass of ``evomerge.merge.fused``; this module stays as the reference that
``benchmarks/bench_merge.py`` compares against (bit for bit) and for callers of ``ties_merge_fast``.

mergekit's TIES argsorts every task vector on every merge; in a search the deltas
never change, only the densities do. Densities come from a grid (default steps of
0.001), so ``MagnitudeThresholds`` sorts |delta| ONCE per tensor per run and keeps,
for every grid density, the magnitude of the k-th largest element with
``k = max(1, int(density * numel))`` exactly as ``methods.magnitude`` counts it.
Trimming is then an elementwise comparison inside the merge pass, no sort per
candidate.

How this differs from exact top-k (``methods.ties`` / mergekit): only among
elements of equal magnitude at the threshold. Both keep exactly k elements with
the same multiset of magnitudes; mergekit keeps whichever tied elements its
(unstable) argsort happens to put first, the default ``tie_break="index"`` keeps
the tied ones with the lowest flat index (a threshold plus one index cutoff per
grid point). On float32 deltas with continuous values there are no ties and the
merge is bit-identical to ``methods.ties`` (tested). bfloat16 deltas are
quantized, so ties are common and some tied positions differ (tested: only there).
``tie_break="argsort"`` stores mergekit's rank of every element (int32) and is
bit-identical in bf16 as well, at 4 extra bytes read per element. Off-grid
densities cost one ``kthvalue`` (cached), so every density works.

Device-agnostic (CPU, CUDA): thresholds live on the delta's device as tensors and
cutoffs are Python ints, so applying them never syncs with the device.
"""

from __future__ import annotations

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

    def drop_mask(self, density: float, delta: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Boolean mask of the entries trimming drops (True = dropped); None when
        nothing is dropped (density >= 1)."""
        if density >= 1:
            return None
        d = self.delta if delta is None else delta
        if density <= 0 or self.numel == 0:
            return torch.ones_like(d, dtype=torch.bool)
        if self.ranks is not None:
            return self.ranks >= self.k(density)
        bounds = self.threshold(density)
        assert bounds is not None  # None only for density >= 1, returned above
        thr, cutoff = bounds
        a = d.abs()
        drop = a < thr
        if cutoff is not None:  # ties at the threshold beyond k: drop the later ones
            drop.view(-1)[cutoff:] |= a.view(-1)[cutoff:] == thr
        return drop

    def trim_(self, x: torch.Tensor, density: float, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Zero, in place, the entries of ``x`` (shaped like the delta) that top-k
        trimming at ``density`` drops; returns ``x``."""
        drop = self.drop_mask(density, delta)
        return x if drop is None else x.masked_fill_(drop, 0)

    def mask(self, density: float, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Boolean keep-mask (True = kept) of ``delta`` (default: the build tensor)."""
        drop = self.drop_mask(density, delta)
        d = self.delta if delta is None else delta
        return torch.ones_like(d, dtype=torch.bool) if drop is None else ~drop

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
    ``* lambda_``; ``+ base``), but trimming compares |delta| with a precomputed
    threshold and the model axis is streamed: two elementwise passes over the
    deltas, no stacked copy, no sort. Pass 1 keeps each model's drop mask (1 byte
    an element) for pass 2. With ``maj`` = the elected sign (+-1), agreeing entries
    are those with ``w*d*maj > 0``, so the disjoint sum is
    ``maj * sum(relu(w*d*maj))``: exact, as multiplying by +-1 is.
    Writes into ``out`` (e.g. the live model's parameter) when given; ``out`` may be
    ``base`` itself if the caller does not need the base afterwards.
    """
    n = len(deltas)
    if not (len(thresholds) == len(weights) == len(densities) == n):
        raise ValueError("deltas, thresholds, weights and densities must align")
    dtype = base.dtype
    acc = _acc_dtype(dtype)
    # mergekit casts the weights to the working dtype before multiplying
    w_cast = [float(torch.tensor(float(w), dtype=dtype)) for w in weights]
    active = [i for i in range(n) if densities[i] > 0 and w_cast[i] != 0]

    # pass 1: elected sign = sign of the sum of weighted trimmed deltas
    sign_weight = torch.zeros(base.shape, dtype=acc, device=base.device)
    drops: dict[int, Optional[torch.Tensor]] = {}
    for i in active:
        wd = deltas[i] * w_cast[i]
        drop = thresholds[i].drop_mask(densities[i], deltas[i])
        if drop is not None:
            wd.masked_fill_(drop, 0)
        drops[i] = drop
        sign_weight.add_(wd)
        del wd
    # elect after rounding to the working dtype, as mergekit's dtype-typed sum does
    maj = torch.where(sign_weight.to(dtype) >= 0, 1.0, -1.0).to(dtype)
    del sign_weight

    # pass 2: disjoint sum over agreeing entries, and the sum of their weights
    mixed = torch.zeros(base.shape, dtype=acc, device=base.device)
    divisor = torch.zeros(base.shape, dtype=acc, device=base.device) if normalize else None
    for i in active:
        r = deltas[i] * w_cast[i]
        drop_i = drops[i]
        if drop_i is not None:
            r.masked_fill_(drop_i, 0)
        r.mul_(maj).clamp_min_(0)  # agreeing entries as |w*d|, the rest 0
        mixed.add_(r)
        if divisor is not None:
            divisor.add_(r > 0, alpha=w_cast[i])
        drops[i] = None
        del r
    mixed = mixed.to(dtype).mul_(maj)
    if divisor is not None:
        divisor = divisor.to(dtype)
        divisor.masked_fill_(divisor == 0, 1)
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    if out is None:
        return (base + mixed).to(dtype)
    if out.dtype == dtype:
        return torch.add(base, mixed, out=out)
    return out.copy_(base + mixed)
