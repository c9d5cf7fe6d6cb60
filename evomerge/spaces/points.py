"""Where a parameter-space gene sits along the layers, and how many genes a space gets by default.

Two kinds of points:
- groups (granularity layer / block / model): a gene's value holds for every layer of its group, and the
  recipe keeps one value per layer (a mergekit gradient list as long as the model is deep);
- a curve (granularity curve): K control points spread evenly over the layers; the recipe keeps the K values
  as a mergekit gradient list, which mergekit (and evomerge) interpolate linearly at layer i / (n - 1). So the
  genome is the gradient list itself, and the live merge and `mergekit-yaml` read the same numbers.

`granularity: auto` (the default) keeps about ITEMS_PER_GENE scored search items per gene: one gene per layer
when that allows it, else the largest curve that does (at least 2 points: a straight ramp over the depth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.recipe import evaluate_setting

ITEMS_PER_GENE = 10  # scored search items per evolved gene that `granularity: auto` keeps at least
MIN_POINTS = 2


@dataclass(frozen=True)
class Points:
    """The points of one space: `groups` of layers (one value each) or a `curve` of K control points."""

    num_layers: int
    groups: tuple[tuple[int, ...], ...] = ()
    curve: int = 0  # K control points (0: groups)

    @classmethod
    def grouped(cls, num_layers: int, size: int) -> Points:
        n = max(num_layers, 1)
        return cls(num_layers, tuple(tuple(range(i, min(i + size, n))) for i in range(0, n, size)))

    @classmethod
    def curved(cls, num_layers: int, k: int) -> Points:
        return cls(num_layers, curve=k)

    def __len__(self) -> int:
        return self.curve or len(self.groups)

    def layer_values(self, point_values: list[float]) -> list[float]:
        """The value at every layer, as the recipe's setting resolves it."""
        if not self.curve:
            out = [0.0] * self.num_layers
            for group, v in zip(self.groups, point_values):
                for layer in group:
                    out[layer] = v
            return out
        n = self.num_layers
        return [float(evaluate_setting("", list(point_values), i / (n - 1) if n > 1 else 1.0)) for i in range(n)]

    def setting(self, point_values: list[float]) -> Any:
        """What the recipe keeps: one scalar when all values agree, else a gradient list."""
        values = list(point_values) if self.curve else self.layer_values(point_values)
        return values[0] if len(set(values)) == 1 else values

    def position(self, i: int) -> float:
        """The gradient position t of point i (where a hand-written recipe is read to encode it)."""
        if self.curve:
            return i / (self.curve - 1)
        layer = self.groups[i][0]
        return layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0

    def name(self, i: int) -> str:
        """`layer3`, `layers0-1`, `all_layers`, or `curve2of4` (control point 2 of 4)."""
        if self.curve:
            return f"curve{i}of{self.curve}"
        layers = self.groups[i]
        if len(layers) == 1:
            return f"layer{layers[0]}"
        return "all_layers" if len(layers) == self.num_layers else f"layers{layers[0]}-{layers[-1]}"

    def describe(self) -> str:
        if self.curve:
            return f"a curve of {self.curve} control points over {self.num_layers} layers"
        return f"{len(self.groups)} layer group{'s' if len(self.groups) != 1 else ''} ({self.num_layers} layers)"


def auto_points(num_layers: int, genes_per_point: int, search_items: int | None) -> tuple[Points, str]:
    """The default layout and why: per layer while genes <= items / ITEMS_PER_GENE, else the largest curve
    that keeps it (never fewer than MIN_POINTS points). Unknown item counts keep one gene per layer."""
    if search_items is None:
        return Points.grouped(num_layers, 1), "per layer (search split sizes not stated: set n_search to size it)"
    budget = search_items // ITEMS_PER_GENE
    if genes_per_point * num_layers <= budget or num_layers <= MIN_POINTS:
        return Points.grouped(num_layers, 1), f"per layer ({search_items} search items)"
    k = max(MIN_POINTS, min(num_layers - 1, budget // max(genes_per_point, 1)))
    return Points.curved(num_layers, k), f"curve of {k} points ({search_items} search items, " \
                                         f"about {ITEMS_PER_GENE} per gene)"


def stated_search_items(config: Any) -> int | None:
    """Search items the space's tasks state (n_search, or per_category x subjects); None if one does not."""
    total = 0
    for task in config.tasks:
        if task.n_search:
            total += task.n_search
        elif task.per_category and task.subjects:
            total += task.per_category * len(task.subjects)
        else:
            return None
    return total
