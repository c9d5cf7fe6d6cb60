"""mergekit passthrough recipes for layer stacks: a DFS path with its transition scales folded into per-tensor
`scale` parameters (`to_passthrough_recipe`), and SOLAR's depth up-scaling (`dus_path`, `dus_recipe`).

Pure data: nothing here loads a model. Why folding the scales into o_proj/down_proj reproduces the scaled
stack is explained in `evomerge.merge.stacking`; the live model of such a recipe is
`evomerge.merge.stacking.build_recipe_model`.
"""

from __future__ import annotations

import copy as _copy
from typing import Any, Sequence

from evomerge.errors import ConfigError
from evomerge.merge.dfs import validate_path

Path = list[tuple[int, int]]

__all__ = ["cumulative_scales", "to_passthrough_recipe", "dus_path", "dus_recipe"]


def cumulative_scales(scales: Sequence[float]) -> list[float]:
    """c_k = s_1 * ... * s_k: the factor between the stacked and the folded residual stream."""
    out, c = [], 1.0
    for s in scales:
        c *= float(s)
        out.append(c)
    return out


def _runs(path: Path) -> list[tuple[int, int, int, int]]:
    """Maximal runs (start position, end position, source, first layer) of consecutive layers of one model."""
    runs = []
    start = 0
    for k in range(1, len(path) + 1):
        if k == len(path) or path[k][0] != path[k - 1][0] or path[k][1] != path[k - 1][1] + 1:
            runs.append((start, k, path[start][0], path[start][1]))
            start = k
    return runs


def to_passthrough_recipe(path: Sequence[tuple[int, int]], scales: Sequence[float], model_refs: Sequence[str],
                          target_index: int, dtype: str | None = "float32",
                          residual_tensors: Sequence[str] = ("o_proj", "down_proj")) -> dict:
    """A mergekit (0.1.5) passthrough recipe for the folded stack, as the dict dumped to YAML.

    - One slice per run of consecutive layers of one model. mergekit's passthrough multiplies each
      tensor by its `scale` parameter; a filtered scale ({filter: o_proj, value: 1/c}) applies to
      every tensor whose input name contains the filter. Inside a slice of n layers mergekit reads a
      list value at t = i/(n-1) with linear interpolation, so a list of the n per-layer factors gives
      each layer its own 1/c_k (exact up to one rounding of t): runs never need splitting.
    - mergekit takes the pre-layer tensors (embeddings) from the first slice's model and the
      post-layer ones (final norm, lm_head) from the last slice's; the output config from
      base_model. The recipe sets base_model to the target and, where the path starts or ends on
      another model, adds an empty slice (layer_range [0, 0]) of the target so those come from it.
    - For pre-norm models (Llama, Mistral, Qwen2): o_proj and down_proj. Gemma 2/3 folds into
      (1 + w) norm gains, which a multiplicative scale cannot express: materialize with
      `fold_scales` and save that model instead.
    """
    path = [(int(s), int(layer)) for s, layer in path]
    scales = [float(s) for s in scales]
    if not model_refs:
        raise ConfigError("no model references", key="models", allowed="one reference per source")
    if not 0 <= int(target_index) < len(model_refs):
        raise ConfigError(f"target index {target_index}", key="target", allowed=f"0..{len(model_refs) - 1}")
    validate_path(path, scales, [10 ** 9] * len(model_refs))
    refs = [str(r) for r in model_refs]
    target_ref = refs[int(target_index)]
    factors = [1.0 / c for c in cumulative_scales(scales)]

    slices: list[dict] = []
    for a, b, src, first in _runs(path):
        source: dict[str, Any] = {"model": refs[src], "layer_range": [first, first + (b - a)]}
        f = factors[a:b]
        if any(x != 1.0 for x in f):
            value: float | list[float] = f[0] if all(x == f[0] for x in f) else list(f)
            source["parameters"] = {"scale": [{"filter": name, "value": value} for name in residual_tensors]}
        slices.append({"sources": [source]})
    empty = {"sources": [{"model": target_ref, "layer_range": [0, 0]}]}
    if slices[0]["sources"][0]["model"] != target_ref:
        slices.insert(0, _copy.deepcopy(empty))
    if slices[-1]["sources"][0]["model"] != target_ref:
        slices.append(_copy.deepcopy(empty))
    recipe: dict[str, Any] = {"merge_method": "passthrough", "base_model": target_ref, "slices": slices}
    if dtype is not None:
        recipe["dtype"] = dtype
    return recipe


def dus_path(num_layers: int, drop: int = 8) -> Path:
    """SOLAR's depth up-scaling: layers [0, n-drop) then [drop, n) of one model, 2n - 2*drop layers."""
    n, d = int(num_layers), int(drop)
    if n < 1:
        raise ConfigError(f"num_layers={num_layers}", key="num_layers", allowed="an integer >= 1")
    if not 0 <= d < n:
        raise ConfigError(f"drop={drop} for a {n}-layer model", key="drop", allowed=f"0 <= drop < {n}")
    return [(0, i) for i in range(n - d)] + [(0, i) for i in range(d, n)]


def dus_recipe(model_ref: str, num_layers: int, drop: int = 8, dtype: str | None = None) -> dict:
    """The SOLAR depth up-scaling passthrough recipe (dtype None keeps the model's dtype)."""
    dus_path(num_layers, drop)  # validates
    n, d = int(num_layers), int(drop)
    recipe: dict[str, Any] = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(model_ref), "layer_range": [0, n - d]}]},
            {"sources": [{"model": str(model_ref), "layer_range": [d, n]}]},
        ],
    }
    if dtype is not None:
        recipe["dtype"] = dtype
    return recipe
