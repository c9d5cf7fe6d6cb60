"""The data-flow-space (DFS) genome of Sakana's evolutionary model merge, as pure functions.

Sakana (Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes") lays the layers of
all source models out in one order (model 0's n_0 layers, then model 1's n_1 layers, ...: M layers
in all) and repeats that sequence r times, giving T = M * r slots. An indicator array I of length T
says which slots the path uses (slot t is used when I_t > 0), in slot order. A scale matrix W[M, M]
counters the distribution shift of the residual stream: the hidden state is multiplied by
W[prev, cur] before it enters layer `cur`, where prev and cur are global layer indices in [0, M).

Here the genome is a vector in the unit box [0, 1]^d, d = T + M * M:
- genes [0, T): indicators; slot t is used when gene_t > 0.5 (encode writes 0.75 / 0.25, the
  middle of each half, so a search started there is not one tiny step away from flipping a bit);
- genes [T, T + M*M): W in row-major order (W[prev, cur] = genes[T + prev * M + cur]), mapped
  linearly to [lo, hi] of `scale_bounds`: s = lo + gene * (hi - lo).
With `fix_ends` (the default, as in Sakana's runs) the path always starts with the target model's
first layer and ends with its last layer; the indicators choose the layers in between. The first
layer of the path gets scale 1 (the embedding output enters unscaled); every later position gets
W[prev, cur]. Genes outside [0, 1] are clipped (optimizers may step slightly outside the box).

A path is a list of (source index, layer index) pairs; scales has one float per path position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from evomerge.errors import ConfigError

Path = list[tuple[int, int]]

_ON, _OFF = 0.75, 0.25


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _head_dim(cfg: Any) -> int | None:
    hd = _get(cfg, "head_dim")
    if hd:
        return int(hd)
    hidden, heads = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    return int(hidden) // int(heads) if hidden and heads else None


def _rope(cfg: Any) -> Any:
    params = _get(cfg, "rope_parameters")
    if params is None:
        params = {"rope_theta": _get(cfg, "rope_theta"), "rope_scaling": _get(cfg, "rope_scaling")}
    return params


def check_stackable(configs: Sequence[Any], names: Sequence[str] | None = None) -> None:
    """Raise ConfigError unless layers of these models can be stacked into one model.

    Layers of different models exchange the residual stream (same hidden size), and all positions
    use the target's rotary embedding (same head_dim and rope parameters); a plain model and a
    mergekit passthrough merge also need one architecture (same model_type).
    """
    if not configs:
        raise ConfigError("no source models given", key="sources", allowed="one or more models")
    names = list(names) if names is not None else [f"source {i}" for i in range(len(configs))]
    ref = configs[0]
    checks = [
        ("model_type", lambda c: _get(c, "model_type")),
        ("hidden_size", lambda c: _get(c, "hidden_size")),
        ("head_dim", _head_dim),
        ("rope_parameters", _rope),
    ]
    for i, cfg in enumerate(configs[1:], start=1):
        for key, fn in checks:
            a, b = fn(ref), fn(cfg)
            if a != b:
                raise ConfigError(
                    f"{names[i]} has {key}={b!r} but {names[0]} has {key}={a!r}; layers of these models "
                    "cannot be stacked into one model",
                    key=key, allowed=f"the same {key} in every source model",
                )


def validate_path(path: Sequence[tuple[int, int]], scales: Sequence[float], layer_counts: Sequence[int],
                  max_len: int | None = None) -> None:
    """Raise ConfigError for an empty or too long path, unknown layers, or non-positive scales."""
    if len(path) == 0:
        raise ConfigError("the layer path uses no layer", key="path", allowed="at least one (source, layer) pair")
    if max_len is not None and len(path) > max_len:
        raise ConfigError(f"the layer path has {len(path)} layers, more than the maximum {max_len}",
                          key="max_len", allowed=f"paths of at most {max_len} layers")
    if len(scales) != len(path):
        raise ConfigError(f"{len(scales)} scales for a path of {len(path)} layers", key="scales",
                          allowed="one scale per path position")
    for k, (src, layer) in enumerate(path):
        if not 0 <= src < len(layer_counts):
            raise ConfigError(f"path position {k} names source {src}", key="path",
                              allowed=f"source indices 0..{len(layer_counts) - 1}")
        if not 0 <= layer < layer_counts[src]:
            raise ConfigError(f"path position {k} names layer {layer} of source {src}", key="path",
                              allowed=f"layers 0..{layer_counts[src] - 1} of source {src}")
    for k, s in enumerate(scales):
        if not (np.isfinite(s) and s > 0):
            # RMSNorm is only invariant to positive factors: N(-x) = -N(x).
            raise ConfigError(f"scale {s!r} at path position {k}", key="scales", allowed="finite values > 0")


@dataclass(frozen=True)
class DfsSpace:
    """Sakana's DFS genome over the layers of `layer_counts` models, repeated `repeats` times."""

    layer_counts: tuple[int, ...]
    repeats: int = 2
    target: int = 0
    max_len: int | None = None
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    fix_ends: bool = True
    offsets: tuple[int, ...] = field(init=False, repr=False)

    def __init__(self, layer_counts: Sequence[int], repeats: int = 2, target: int = 0, max_len: int | None = None,
                 scale_bounds: tuple[float, float] = (0.5, 1.5), fix_ends: bool = True):
        counts = tuple(int(n) for n in layer_counts)
        if not counts or any(n < 1 for n in counts):
            raise ConfigError(f"layer counts {list(layer_counts)}", key="layer_counts",
                              allowed="one positive layer count per source model")
        if int(repeats) < 1:
            raise ConfigError(f"repeats={repeats}", key="repeats", allowed="an integer >= 1")
        if not 0 <= int(target) < len(counts):
            raise ConfigError(f"target={target}", key="target", allowed=f"a source index 0..{len(counts) - 1}")
        lo, hi = (float(x) for x in scale_bounds)
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
            raise ConfigError(f"scale_bounds=({lo}, {hi})", key="scale_bounds", allowed="0 < lo <= hi")
        min_len = 2 if fix_ends and counts[int(target)] > 1 else 1
        if max_len is not None and int(max_len) < min_len:
            raise ConfigError(f"max_len={max_len}", key="max_len", allowed=f"an integer >= {min_len}")
        object.__setattr__(self, "layer_counts", counts)
        object.__setattr__(self, "repeats", int(repeats))
        object.__setattr__(self, "target", int(target))
        object.__setattr__(self, "max_len", None if max_len is None else int(max_len))
        object.__setattr__(self, "scale_bounds", (lo, hi))
        object.__setattr__(self, "fix_ends", bool(fix_ends))
        object.__setattr__(self, "offsets", tuple(int(x) for x in np.cumsum((0,) + counts[:-1])))

    # ---- sizes and index maps -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """M: the layers of all sources together."""
        return sum(self.layer_counts)

    @property
    def num_slots(self) -> int:
        """T = M * r: the length of the indicator array."""
        return self.num_layers * self.repeats

    @property
    def genome_size(self) -> int:
        return self.num_slots + self.num_layers ** 2

    def global_index(self, src: int, layer: int) -> int:
        return self.offsets[src] + layer

    def layer_of(self, g: int) -> tuple[int, int]:
        """(source, layer) of global layer index g in [0, M)."""
        src = int(np.searchsorted(self.offsets, g, side="right")) - 1
        return src, g - self.offsets[src]

    @property
    def first(self) -> tuple[int, int]:
        return (self.target, 0)

    @property
    def last(self) -> tuple[int, int]:
        return (self.target, self.layer_counts[self.target] - 1)

    def _scale_to_gene(self, s: float) -> float:
        lo, hi = self.scale_bounds
        if hi == lo:
            return 0.5
        return (s - lo) / (hi - lo)

    def _gene_to_scale(self, g: float) -> float:
        lo, hi = self.scale_bounds
        return float(lo + g * (hi - lo))

    # ---- genome <-> path --------------------------------------------------------------------
    def decode(self, genome: Sequence[float] | np.ndarray, *, strict: bool = True) -> tuple[Path, list[float]]:
        """(path, scales) of a genome in [0, 1]^genome_size.

        A path longer than max_len raises ConfigError; with strict=False it is cut to its first
        max_len layers instead (keeping the fixed last layer), so a search can keep going.
        """
        x = np.asarray(genome, dtype=np.float64).reshape(-1)
        if x.size != self.genome_size:
            raise ConfigError(f"genome of length {x.size}", key="genome", allowed=f"length {self.genome_size}")
        if not np.all(np.isfinite(x)):
            raise ConfigError("genome has NaN or infinite genes", key="genome", allowed="finite values in [0, 1]")
        x = np.clip(x, 0.0, 1.0)
        M = self.num_layers
        used = [t % M for t in range(self.num_slots) if x[t] > 0.5]
        inner = [self.layer_of(g) for g in used]
        path = [self.first] + inner + [self.last] if self.fix_ends else inner
        if self.fix_ends and self.first == self.last:
            path = path[:-1]  # a one-layer target: its first layer is its last
        if self.max_len is not None and len(path) > self.max_len and not strict:
            path = path[: self.max_len - 1] + [path[-1]] if self.fix_ends else path[: self.max_len]
        W = x[self.num_slots:].reshape(M, M)
        scales = [1.0] + [self._gene_to_scale(W[self.global_index(*a), self.global_index(*b)])
                          for a, b in zip(path[:-1], path[1:])]
        validate_path(path, scales[: len(path)], self.layer_counts, self.max_len)
        return path, scales[: len(path)]

    def encode(self, path: Sequence[tuple[int, int]], scales: Sequence[float] | None = None) -> np.ndarray:
        """A genome that decodes to (path, scales), for seeding a search (identity path, DUS, ...).

        The inner path must be a subsequence of the slot order (M layers repeated r times); every
        transition (prev, cur) must use one scale (W has one entry per pair) inside scale_bounds, and
        the first scale must be 1. Unused W entries get scale 1 when the bounds allow it.
        """
        path = [(int(s), int(layer)) for s, layer in path]
        scales = [1.0] * len(path) if scales is None else [float(s) for s in scales]
        validate_path(path, scales, self.layer_counts, self.max_len)
        if abs(scales[0] - 1.0) > 1e-12:
            raise ConfigError(f"first scale {scales[0]} cannot be encoded", key="scales",
                              allowed="1.0 at the first position (the embedding enters unscaled)")
        if self.fix_ends:
            one_layer = self.first == self.last
            if path[0] != self.first or (len(path) < 2 and not one_layer) or (not one_layer and path[-1] != self.last):
                raise ConfigError(f"path {path[:1]}...{path[-1:]} does not start with {self.first} and end with "
                                  f"{self.last}", key="path",
                                  allowed="paths with the target's first and last layer fixed")
            inner = path[1:-1] if not one_layer else path[1:]
        else:
            inner = path
        M = self.num_layers
        genome = np.full(self.genome_size, _OFF)
        t = 0
        for k, layer in enumerate(inner):
            g = self.global_index(*layer)
            while t < self.num_slots and t % M != g:
                t += 1
            if t >= self.num_slots:
                raise ConfigError(f"path position {k} {layer} does not fit {self.repeats} repeat(s) of the layer order",
                                  key="path", allowed="paths that are a subsequence of the repeated layer order")
            genome[t] = _ON
            t += 1
        lo, hi = self.scale_bounds
        W = np.full((M, M), float(np.clip(self._scale_to_gene(1.0), 0.0, 1.0)))
        seen: dict[tuple[int, int], float] = {}
        for a, b, s in zip(path[:-1], path[1:], scales[1:]):
            key = (self.global_index(*a), self.global_index(*b))
            if not lo - 1e-12 <= s <= hi + 1e-12:
                raise ConfigError(f"scale {s} for transition {a}->{b}", key="scales", allowed=f"[{lo}, {hi}]")
            if key in seen and abs(seen[key] - s) > 1e-9:
                raise ConfigError(f"transition {a}->{b} used with scales {seen[key]} and {s}", key="scales",
                                  allowed="one scale per (previous, next) layer pair")
            seen[key] = s
            W[key] = self._scale_to_gene(s)
        genome[self.num_slots:] = W.reshape(-1)
        return genome

    def identity_path(self) -> Path:
        """The target model as it is: its layers in order."""
        return [(self.target, i) for i in range(self.layer_counts[self.target])]
