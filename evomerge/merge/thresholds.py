"""TIES trimming tables for the search: one threshold per grid density, exact where magnitudes tie.

mergekit keeps, per task vector, the ``k = max(1, int(density * numel))`` elements first in
``torch.argsort(|delta|.float(), descending=True)`` (on CPU). In a search the deltas never change and the
densities sit on a grid (0.001), so ``GridThresholds`` argsorts ONCE per delta and keeps:

- ``thresholds``: float32 ``[steps + 1]``, entry g = the k-th largest magnitude at density g/steps
  (g = 0: +inf, g = steps: -inf). Trimming is then ``drop = |delta| < thr`` inside the fused merge pass.
- where the k-th magnitude is *tied* (more than k elements reach it; common: bf16 deltas always, float32
  fine-tune deltas often, see ``evomerge.models.memory.RANK_BYTES``) the comparison keeps too many. Exact mode
  (``ties="exact"``) stores, in mergekit's own argsort order, the flat indices of the tied elements mergekit
  drops at each grid density: one int32 array per delta (each sorted position stored at most once) plus an
  int32 (start, end) pair per grid density; the merge re-does those few positions (``evomerge.merge.fused``).
  Bit for bit mergekit's choice, without a per-element rank table. Zero magnitudes are never "fixed": keeping
  or dropping a zero delta changes nothing.
  Where ties are everywhere (bfloat16: the lists would hold most elements) a dense int32 rank table, mergekit's
  argsort rank of every element, costs the same memory and no fixups: ``keep = rank < k`` inside the kernel,
  for any density. ``layout="auto"`` takes it when the lists would take more than ``DENSE_SHARE`` of its bytes.
- ``ties="index"`` (when even that does not fit): an int64 flat-index cutoff per tied grid density; among tied
  elements the lowest flat indices are kept (same count and magnitudes as mergekit, other positions).

Off-grid densities (``k`` not that of any grid density) return None from ``lookup`` (the caller sorts, exact),
except with a rank table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GridThresholds", "TrimSpec", "DENSE_SHARE"]

DENSE_SHARE = 0.25  # exact ties: a dense rank table once the tie lists (+ bounds) take more than this share of it


@dataclass
class TrimSpec:
    """How to trim one delta at one density: drop ``|delta| < threshold``; among ``|delta| == threshold`` drop
    flat indices >= ``cutoff`` (index mode) or exactly ``fixup`` (exact mode: indices mergekit drops)."""

    threshold: float
    cutoff: int | None = None
    fixup: torch.Tensor | None = None  # int32/int64 flat indices, on the table's device
    k: int | None = None  # with `ranks`: keep rank < k
    ranks: torch.Tensor | None = None  # int32 mergekit argsort rank of every element (dense layout)


class GridThresholds:
    """Thresholds of one delta at every density g/steps, g = 0..steps; see the module docstring."""

    def __init__(self, delta: torch.Tensor, *, steps: int = 1000, ties: str = "exact",
                 device: torch.device | str | None = None, layout: str = "auto"):
        if ties not in ("exact", "index"):
            raise ValueError("ties must be 'exact' or 'index'")
        if layout not in ("auto", "lists", "ranks"):
            raise ValueError("layout must be 'auto', 'lists' or 'ranks'")
        self.numel = n = delta.numel()
        self.steps = steps
        self.ties = ties
        self.device = torch.device(device) if device is not None else delta.device
        # mergekit's exact call on CPU: |delta| (in the delta's dtype), flattened, as float32; its argsort order
        mags = delta.detach().abs().reshape(-1).to("cpu").float()
        perm = torch.argsort(mags, descending=True)
        values = mags[perm]
        del mags
        gs = torch.arange(1, steps)
        ks = torch.tensor([max(1, int((g / steps) * n)) for g in range(1, steps)], dtype=torch.long)
        if n == 0:
            ks = torch.zeros(0, dtype=torch.long)
            gs = gs[:0]
        thr = torch.empty(steps + 1, dtype=torch.float32)
        thr[0], thr[steps] = float("inf"), float("-inf")
        neg = values.neg()
        if n:
            thr[gs] = values[ks - 1]
        count_ge = torch.searchsorted(neg, thr[gs].neg(), right=True)  # elements with |d| >= thr
        count_gt = torch.searchsorted(neg, thr[gs].neg(), right=False)  # elements with |d| > thr
        tied = (count_ge > ks) & (thr[gs] > 0)
        self.thresholds = thr  # host float32: scalars are read without a device sync
        self.fixups: torch.Tensor | None = None  # exact: dropped tied indices in mergekit's order
        self.bounds: torch.Tensor | None = None  # exact: int32 [steps+1, 2] into fixups
        self.cutoffs: torch.Tensor | None = None  # index: int64 [steps+1], n where nothing is tied
        self.ranks: torch.Tensor | None = None  # exact, dense layout: int32 rank of every element
        if ties == "exact" and layout == "ranks":
            ranks = torch.empty(n, dtype=torch.int32)
            ranks[perm] = torch.arange(n, dtype=torch.int32)
            self.ranks = ranks.reshape(delta.shape).to(self.device)
            return
        if not bool(tied.any()):
            return
        if ties == "exact":
            # sorted positions [k, count_ge) of every tied grid density: mergekit's dropped tied elements
            diff = torch.zeros(n + 1, dtype=torch.int32)
            diff.index_add_(0, ks[tied], torch.ones(int(tied.sum()), dtype=torch.int32))
            diff.index_add_(0, count_ge[tied], torch.full((int(tied.sum()),), -1, dtype=torch.int32))
            needed = diff.cumsum(0)[:n] > 0
            lists_bytes = 4 * int(needed.sum()) + 2 * 4 * (steps + 1)
            if layout == "auto" and lists_bytes > DENSE_SHARE * 4 * n:
                ranks = torch.empty(n, dtype=torch.int32)
                ranks[perm] = torch.arange(n, dtype=torch.int32)
                self.ranks = ranks.reshape(delta.shape).to(self.device)
                return
            index_dtype = torch.int32 if n < 2**31 else torch.int64
            self.fixups = perm[needed].to(index_dtype).to(self.device)
            before = torch.zeros(n + 1, dtype=torch.long)
            before[1:] = needed.cumsum(0)
            bounds = torch.zeros(steps + 1, 2, dtype=torch.int32)
            bounds[gs[tied], 0] = before[ks[tied]].int()
            bounds[gs[tied], 1] = before[count_ge[tied]].int()
            self.bounds = bounds
        else:
            cutoffs = torch.full((steps + 1,), n, dtype=torch.long)
            for g, k, gt, ge in zip(gs[tied].tolist(), ks[tied].tolist(), count_gt[tied].tolist(),
                                    count_ge[tied].tolist()):
                tied_idx = perm[gt:ge].sort().values  # the tied elements, by flat index
                cutoffs[g] = int(tied_idx[k - gt - 1]) + 1  # keep the k - gt lowest indices
            self.cutoffs = cutoffs

    @property
    def dense(self) -> bool:
        """True when this table keeps a rank per element (trim with ``rank < k``)."""
        return self.ranks is not None

    def grid_index(self, density: float) -> int | None:
        """The table row of this density (by its k, as mergekit counts), or None off the grid."""
        if density >= 1:
            return self.steps
        if density <= 0:
            return 0
        g = round(density * self.steps)
        if not 0 < g < self.steps:
            return None
        k = max(1, int(density * self.numel))
        return g if k == max(1, int((g / self.steps) * self.numel)) else None

    def lookup(self, density: float) -> TrimSpec | None:
        """The trim of this density, or None off the grid (the caller sorts, as mergekit does)."""
        if self.ranks is not None:
            k = self.numel if density >= 1 else 0 if density <= 0 else max(1, int(density * self.numel))
            return TrimSpec(float("-inf"), k=k, ranks=self.ranks)
        g = self.grid_index(density)
        if g is None:
            return None
        spec = TrimSpec(float(self.thresholds[g]))
        if self.bounds is not None:
            start, end = self.bounds[g].tolist()
            if end > start:
                assert self.fixups is not None
                spec.fixup = self.fixups[start:end]
        if self.cutoffs is not None and int(self.cutoffs[g]) < self.numel:
            spec.cutoff = int(self.cutoffs[g])
        return spec

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by memory-plan category (thresholds; ranks = exact tie data; tie cutoffs)."""
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        return {"thresholds": size(self.thresholds), "ranks": size(self.fixups) + size(self.bounds) + size(self.ranks),
                "tie cutoffs": size(self.cutoffs)}

    def __repr__(self) -> str:
        return f"GridThresholds(numel={self.numel}, steps={self.steps}, ties={self.ties!r}, bytes={self.nbytes()})"
