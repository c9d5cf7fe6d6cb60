"""How genes appear in the Optuna study: readable names in their real units (`sort.weight.layer0 = 0.7`), so
optuna-dashboard shows what was searched. The search itself works on the unit box; a gene's stored value is
`low + g * (high - low)`. Without a layout, genes are `g0000`, `g0001`, ... in [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution


def gene_name(i: int) -> str:
    """Default Optuna parameter name of gene i (zero padded so the dashboard sorts them)."""
    return f"g{i:04d}"


@dataclass(frozen=True)
class GeneLayout:
    names: tuple[str, ...]
    lows: tuple[float, ...]
    highs: tuple[float, ...]

    @classmethod
    def unit(cls, dim: int) -> GeneLayout:
        return cls(tuple(gene_name(i) for i in range(dim)), (0.0,) * dim, (1.0,) * dim)

    def __len__(self) -> int:
        return len(self.names)

    def params(self, genome: np.ndarray) -> dict[str, float]:
        """The genome as named parameters in real units."""
        return {n: float(lo + float(g) * (hi - lo)) for n, lo, hi, g in zip(self.names, self.lows, self.highs, genome)}

    def distributions(self) -> dict[str, BaseDistribution]:
        return {n: FloatDistribution(lo, hi) for n, lo, hi in zip(self.names, self.lows, self.highs)}

    def genome(self, values: list[float]) -> np.ndarray:
        """Real-unit values (in layout order) back to the unit box."""
        return np.array([(v - lo) / (hi - lo) for v, lo, hi in zip(values, self.lows, self.highs)])


@dataclass(frozen=True)
class Gene:
    """One evolved value: a parameter of one model (or shared), at one point along the layers, for one
    component; `value` maps the unit-box coordinate to real units (snapped to `grid`), `gene` maps back."""

    param: str
    model: str | None  # None: a shared (global) parameter
    group: int
    component: str  # all | attn | mlp
    low: float
    high: float
    grid: float | None

    @property
    def label(self) -> str:
        who = self.model or "*"
        return f"{self.param}/{who}/{self.component}"

    def value(self, g: float) -> float:
        v = self.low + float(np.clip(g, 0.0, 1.0)) * (self.high - self.low)
        if self.grid:
            v = round(round(v / self.grid) * self.grid, 10)
            v = min(max(v, self.low), self.high)
        return round(v, 6)

    def gene(self, v: float) -> float:
        return float(np.clip((v - self.low) / (self.high - self.low), 0.0, 1.0))
