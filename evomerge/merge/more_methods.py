"""More merge methods as pure tensor functions, numerically equal to mergekit 0.1.5.

Covers the mergekit 0.1.5 methods that ``methods`` lacks: ``arcee_fusion``,
``karcher``, ``multislerp``, ``nearswap``, ``sce``, ``ram`` and ``ramplus_tl``.
Like ``methods``, nothing here knows about YAML or files: each function takes the
tensors of ONE parameter and resolved scalars (per-model values as sequences
aligned with ``tensors``) and returns the merged tensor.

Reference: ``mergekit/merge_methods/{arcee_fusion,karcher,multislerp,nearswap,sce,
ram}.py`` (0.1.5). Each function first promotes its inputs to a common dtype, as
mergekit's ``align_dtype`` does before any group kernel, and then repeats mergekit's
arithmetic operation by operation: the same ops, in the same order, on the same
dtypes, with Python scalars where mergekit has Python scalars and 0-dim tensors
where it has 0-dim tensors (the two promote differently). Results are therefore
bit-identical to mergekit's kernels in float32 and bfloat16 on the same device,
including the output dtype (see ``MORE_DIFFERENCES_FROM_MERGEKIT`` for the two
methods whose kernels return float32 for half-precision inputs).

Randomness: only ``arcee_fusion`` draws random numbers, and only for tensors of
more than 1,000,000 elements (a quantile estimate from a sample drawn with
replacement). It draws from an explicit ``torch.Generator``; ``generator=None``
uses the global generator exactly as mergekit does, and a generator seeded with
``s`` draws what mergekit draws after ``torch.manual_seed(s)``.

``MORE_METHOD_ROWS`` describes every method for the registry (mergekit's names,
defaults, base policy and input counts) together with an adapter
``fn(base, tensors, params, generator)`` in ``registry``'s convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "MORE_DIFFERENCES_FROM_MERGEKIT",
    "MORE_METHOD_ROWS",
    "MORE_ADAPTERS",
    "ARCEE_FUSION_SAMPLE_SIZE",
    "arcee_fusion",
    "arcee_fusion_importance",
    "karcher",
    "multislerp",
    "nearswap",
    "sce",
    "sce_mask",
    "sce_weight",
    "ram",
    "ramplus_tl",
]

MORE_DIFFERENCES_FROM_MERGEKIT: list[str] = [
    "arcee_fusion and ramplus_tl: mergekit's kernels return float32 for bfloat16/float16 inputs "
    "(arcee_fusion multiplies by a float32 mask, ramplus_tl by a float32 lambda) and mergekit writes "
    "that float32 tensor unless out_dtype is set. The pure functions here return exactly that; the "
    "registry adapters cast the result back to the inputs' dtype (evomerge's rule that a merged "
    "tensor has its inputs' dtype), which equals mergekit run with out_dtype set to that dtype.",
    "arcee_fusion on tensors of more than 1,000,000 elements estimates its quantiles from a random "
    "sample; evomerge draws it from an explicit torch.Generator (mergekit: the global generator). "
    "Seeded with the same number the draws, and so the results, are identical.",
    "karcher: mergekit's karcher ignores the base policy and merges every input it is given, so a "
    "mergekit config with base_model adds the base as one more equally weighted input. The row "
    "says base 'unused'; to reproduce such a config pass the base among ``tensors``.",
    "sce with no models besides the base returns the base (as mergekit does); the row still asks "
    "for at least one model.",
]

ARCEE_FUSION_SAMPLE_SIZE = 1_000_000  # mergekit's _QUANTILE_SAMPLE_SIZE


# --------------------------------------------------------------------------- dtypes
def _promote(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast all inputs to their promoted dtype, as mergekit's ``align_dtype`` does."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype=dtype) for t in tensors]


# --------------------------------------------------------------------- arcee_fusion
def arcee_fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|model - base| * KL(softmax(model) || softmax(base))`` per last-axis row."""
    diff = (model - base).abs()
    eps = 1e-8
    p = F.softmax(model, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl_div = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl_div


def _approximate_quantiles(
    tensor: torch.Tensor, q: torch.Tensor, generator: Optional[torch.Generator]
) -> torch.Tensor:
    flat_tensor = tensor.reshape(-1)
    if flat_tensor.numel() > ARCEE_FUSION_SAMPLE_SIZE:
        flat_tensor = flat_tensor[
            torch.randint(
                flat_tensor.numel(),
                (ARCEE_FUSION_SAMPLE_SIZE,),
                device=flat_tensor.device,
                generator=generator,
            )
        ]
    sorted_tensor, _ = torch.sort(flat_tensor)
    quantile_indices = (q.to(sorted_tensor.device) * (sorted_tensor.numel() - 1)).long()
    return sorted_tensor[quantile_indices]


def arcee_fusion(
    base: torch.Tensor, model: torch.Tensor, *, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Arcee Fusion: take the model's value where its importance is an upper outlier.

    importance = ``|model - base| * KL`` (KL of the row softmaxes, last axis; a 1-D
    tensor is one row); threshold = ``median + 1.5 * (q3 - q1)`` of the importances
    (index quantiles of the sorted values, estimated from 1,000,000 samples drawn
    with replacement when the tensor is larger); result
    ``base + (model - base) * (importance >= threshold)``. The mask is float32, so
    half-precision inputs give a float32 result, exactly as in mergekit. The KL is
    computed in the inputs' dtype: in bfloat16 it can round to <= 0 for rows that
    barely change, and the selection then favours the smallest changes (mergekit's
    numbers, reproduced, not corrected).
    """
    base, model = _promote(base, model)
    importance = arcee_fusion_importance(model, base)
    q1, median, q3 = _approximate_quantiles(importance, torch.tensor([0.25, 0.5, 0.75]), generator)
    threshold = median + 1.5 * (q3 - q1)
    fusion_mask = (importance >= threshold).float()
    return base + (model - base) * fusion_mask


# -------------------------------------------------------------------------- karcher
def karcher(
    tensors: Sequence[torch.Tensor],
    alphas: Optional[Sequence[float]] = None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean on the unit sphere, rescaled by ``sum(alpha_i*|t_i|)``.

    Each tensor is flattened and normalized (norms in float32, float64 stays); tensors
    of norm ``<= tol`` leave the direction average (their alphas are dropped from its
    normalization but still count in the scale). The direction starts at the
    normalized weighted mean of the unit vectors (the first valid unit vector if that
    is shorter than ``tol``) and takes up to ``max_iter`` exponential-map steps,
    stopping early when the tangent norm is below ``tol``. ``alphas`` defaults to
    uniform ``1/n`` -- all that mergekit's ``karcher`` method exposes; other values
    reproduce mergekit's ``karcher_merge_tensors`` with those alphas. Directions are
    kept in the inputs' dtype, as mergekit does. One tensor is returned unchanged.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("karcher needs at least one tensor")
    if len(tensors) == 1:
        return tensors[0]
    tensors = _promote(*tensors)
    if alphas is None:
        alphas = [1.0 / len(tensors)] * len(tensors)
    alphas = list(alphas)
    if len(alphas) != len(tensors):
        raise ValueError(f"alphas: expected {len(tensors)} values, got {len(alphas)}")

    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = []
    units = []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        if norm.item() == 0.0:
            units.append(torch.zeros_like(tensor))
        else:
            units.append((tensor / norm).to(tensor.dtype))

    valid_indices = [idx for idx, norm in enumerate(norms) if norm.item() > tol]
    if not valid_indices:
        return sum(tensor * 0 for tensor in tensors)  # type: ignore[return-value]

    valid_alphas = [alphas[idx] for idx in valid_indices]
    alpha_sum = sum(valid_alphas)
    normalized_alphas = [alpha / alpha_sum for alpha in valid_alphas]
    valid_units = [units[idx] for idx in valid_indices]

    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(normalized_alphas, valid_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(normalized_alphas, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)

        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean


# ------------------------------------------------------------------------ multislerp
def multislerp(
    base: Optional[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric spherical interpolation of several models (task vectors with a base).

    The flattened (task) vectors are normalized, their weighted mean direction is
    the tangent point, the weighted tangent-space average is mapped back with the
    exponential map and scaled by the weighted mean norm; the base is added back.
    ``normalize_weights`` divides the weights by their sum (a zero sum gives
    inf/NaN, as in mergekit). When the weighted mean of the unit vectors is shorter
    than ``eps`` two models fall back to ``w0*t0 + w1*t1`` (+ base) and three or more
    raise ValueError, as in mergekit. One model is returned unchanged (without the
    base), as mergekit does. All in the inputs' dtype.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("multislerp needs at least one model")
    weights = list(weights)
    if len(weights) != len(tensors):
        raise ValueError(f"weights: expected {len(tensors)} values (one per model), got {len(weights)}")
    if base is not None:
        base, *tensors = _promote(base, *tensors)
    else:
        tensors = _promote(*tensors)
    if len(tensors) == 1:
        return tensors[0]

    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    tensors_flat = stacked.view(stacked.shape[0], -1)

    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()

    norms = torch.norm(tensors_flat, dim=-1, keepdim=True)
    unit_tensors = tensors_flat / (norms + eps)

    mean = (unit_tensors * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:
            res = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
            if base is not None:
                res = res + base
            return res
        raise ValueError(
            "multislerp: the weighted sum of the unit (task) vectors is zero (antipodal "
            "inputs with balancing weights); use different weights"
        )
    mean = mean / mean_norm

    dots = (unit_tensors * mean).sum(-1, keepdim=True)
    tangent_vectors = unit_tensors - dots * mean
    tangent_result = (tangent_vectors * w.view(-1, 1)).sum(0)

    tangent_norm = torch.norm(tangent_result) + eps
    result = mean * torch.cos(tangent_norm) + tangent_result * (torch.sin(tangent_norm) / tangent_norm)

    avg_norm = (norms.squeeze(-1) * w).sum()
    result = result * avg_norm
    result = result.view(stacked.shape[1:])
    if base is not None:
        result = result + base
    return result


# -------------------------------------------------------------------------- nearswap
def nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap: ``w = clamp(t / max(|base - model|, 1e-6), 0, 1)``, ``w*model + (1-w)*base``.

    Elements where the two models are within ``t`` of each other take the model's
    value; farther apart ones move from the model towards the base (``t <= 0``: the
    base everywhere). In the inputs' dtype.
    """
    a, b = _promote(base, model)
    absdiff = torch.abs(a - b)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


# ------------------------------------------------------------------------------- sce
def _sign_consensus_mask(delta: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """mergekit's TIES ``get_mask(method='sum')``: sign agrees with the summed sign (0 -> +)."""
    sign = delta.sign().to(mask_dtype)
    majority_sign = (delta.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority_sign


def sce_weight(tvs: torch.Tensor) -> torch.Tensor:
    """Per-model weights ``mean(tv_i^2) / sum_j mean(tv_j^2)`` (uniform when the sum < 1e-6)."""
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    weight_sum = torch.sum(weights).item()
    if abs(weight_sum) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / weight_sum


def sce_mask(tvs: torch.Tensor, density: float, mask_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """SCE 'select': 1 at the ``k = int(count_nonzero(var) * density)`` elements of largest
    variance across models (``k`` from a float32 product, like mergekit: 100 * 0.57 -> 57)."""
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=mask_dtype)
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=mask_dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    nonzero = torch.count_nonzero(var)
    k = int(nonzero * density)
    if k == 0:
        return torch.zeros_like(var, dtype=mask_dtype)
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    mask.view(-1)[indices] = 1
    return mask


def sce(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """SCE (select, calculate, erase) on task vectors.

    Select: with ``select_topk < 1`` keep only the elements of largest variance across
    the task vectors (``sce_mask``). Calculate: model weight ``mean(tv_i^2)``,
    normalized (``sce_weight``). Erase: drop entries disagreeing with the summed sign
    (TIES). Result ``base + sum(w_i*keep_i*tv_i) / max(sum(w_i*keep_i), 1e-6)``.
    ``int8_mask`` only changes the masks' dtype, never the numbers. In the inputs'
    dtype. No models: the base.
    """
    tensors = list(tensors)
    base, *tensors = _promote(base, *tensors)
    if not tensors:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    task_vectors = torch.stack([t - base for t in tensors], dim=0)

    if select_topk < 1:
        mask = sce_mask(task_vectors, select_topk, mask_dtype)
        task_vectors = task_vectors * mask.unsqueeze(0)

    erase_mask = _sign_consensus_mask(task_vectors, mask_dtype)

    tv_weights = sce_weight(task_vectors)
    while tv_weights.dim() < task_vectors.dim():
        tv_weights = tv_weights.unsqueeze(-1)

    erased_weights = tv_weights * erase_mask
    merged_tv = (task_vectors * erased_weights).sum(dim=0)
    final_tv = merged_tv / torch.sum(erased_weights, dim=0).clamp(min=1e-6)
    return base + final_tv


# ------------------------------------------------------------------------------- ram
def _prepare_ram_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float):
    task_vectors = torch.stack([t - base for t in tensors], dim=0)
    tv_flat = task_vectors.view(len(tensors), -1)
    nonzero_mask = tv_flat.abs() > epsilon
    contrib_counts = nonzero_mask.sum(dim=0, keepdim=True)
    overlap_mask = contrib_counts > 1
    unique_mask = contrib_counts == 1
    return tv_flat, nonzero_mask, contrib_counts, overlap_mask, unique_mask


def ram(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, epsilon: float = 1e-5) -> torch.Tensor:
    """Reinforced Agent Merging: an element changed (``|tv| > epsilon``) by one model takes
    that model's change; one changed by several takes the mean of their changes; changes
    of at most ``epsilon`` are dropped. In the inputs' dtype. No models: the base."""
    tensors = list(tensors)
    base, *tensors = _promote(base, *tensors)
    if not tensors:
        return base
    tv_flat, nonzero_mask, contrib_counts, overlap_mask, unique_mask = _prepare_ram_vectors(tensors, base, epsilon)
    tv_flat_z = tv_flat * nonzero_mask
    merged_tv_flat = (
        (tv_flat_z * unique_mask) + (tv_flat_z * overlap_mask / contrib_counts.clamp(min=1))
    ).sum(dim=0, keepdim=True)
    return base + merged_tv_flat.reshape_as(base)


def ramplus_tl(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM+ (tensor-local): ``ram`` with each model's unique changes scaled by
    ``1 + r * clamp(shared_i / unique_i, 0, alpha)``, where ``shared_i``/``unique_i``
    count the model's changed elements that other models also / do not change (counted
    within this tensor). The scale is float32, so half-precision inputs give a float32
    result, exactly as in mergekit. ``epsilon`` must be > 0: it is also the floor of
    the unique count, and at 0 a model that changes nothing gives 0/0 = NaN everywhere
    (in mergekit too). No models: the base.
    """
    tensors = list(tensors)
    base, *tensors = _promote(base, *tensors)
    if not tensors:
        return base
    tv_flat, nonzero_mask, contrib_counts, overlap_mask, unique_mask = _prepare_ram_vectors(tensors, base, epsilon)
    shared_counts = (nonzero_mask & overlap_mask).sum(dim=1)
    unique_counts = (nonzero_mask & unique_mask).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    lambda_ = 1 + r * rho.clamp(min=0, max=alpha)

    tv_flat_z = tv_flat * nonzero_mask
    merged_tv_flat = (
        (tv_flat_z * unique_mask * lambda_.unsqueeze(-1))
        + (tv_flat_z * overlap_mask / contrib_counts.clamp(min=1))
    ).sum(dim=0, keepdim=True)
    return base + merged_tv_flat.reshape_as(base)


# ------------------------------------------------------------------------ adapters
# fn(base, tensors, params, generator) -> Tensor, as in registry.py: ``params`` resolved
# (globals as scalars, per-model values as lists aligned with ``tensors``). The result
# has the inputs' (promoted) dtype.
def _in_dtype(result: torch.Tensor, base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    dtype = tensors[0].dtype
    for t in ([base] if base is not None else []) + list(tensors[1:]):
        dtype = torch.promote_types(dtype, t.dtype)
    return result.to(dtype=dtype)


def _arcee_fusion_fn(base, tensors, p, generator):
    return _in_dtype(arcee_fusion(base, tensors[0], generator=generator), base, tensors)


def _karcher_fn(base, tensors, p, generator):
    return karcher(tensors, max_iter=int(p["max_iter"]), tol=p["tol"])


def _multislerp_fn(base, tensors, p, generator):
    return multislerp(base, tensors, p["weight"], normalize_weights=p["normalize_weights"], eps=p["eps"])


def _nearswap_fn(base, tensors, p, generator):
    return nearswap(base, tensors[0], p["t"])


def _sce_fn(base, tensors, p, generator):
    return sce(base, tensors, select_topk=p["select_topk"], int8_mask=p["int8_mask"])


def _ram_fn(base, tensors, p, generator):
    return ram(base, tensors, epsilon=p["epsilon"])


def _ramplus_tl_fn(base, tensors, p, generator):
    return _in_dtype(ramplus_tl(base, tensors, r=p["r"], alpha=p["alpha"], epsilon=p["epsilon"]), base, tensors)


# ----------------------------------------------------------------------- registry rows
_INF = math.inf


def _param(
    name: str,
    default: Any,
    *,
    kind: str = "float",
    low: float = -_INF,
    high: float = _INF,
    low_open: bool = False,
    high_open: bool = False,
    per_model: bool = False,
    doc: str = "",
) -> dict[str, Any]:
    return {
        "name": name,
        "default": default,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "per_model": per_model,
        "kind": kind,
        "doc": doc,
    }


# Names, defaults, kinds, per-model scope, base policy and input counts are mergekit
# 0.1.5's own declarations. mergekit declares no ranges (only types); the low/high
# bounds below are evomerge's: the values where each parameter means something
# (mergekit accepts any number and the maths below defines a result for all of them).
MORE_METHOD_ROWS: list[dict[str, Any]] = [
    {
        "name": "arcee_fusion",
        "base": "required",
        "params": [],
        "min_models": 1,
        "max_models": 1,
        "random": True,
        "doc": "take the model's value where |model-base|*KL(softmax) is an upper outlier "
        "(>= median + 1.5*IQR); random (sampled quantiles) only above 1M elements",
        "fn": _arcee_fusion_fn,
    },
    {
        "name": "karcher",
        "base": "unused",
        "params": [
            _param("max_iter", 10, kind="int", low=0,
                   doc="most Riemannian gradient steps (0: normalized Euclidean mean of directions)"),
            _param("tol", 1e-5, low=0.0,
                   doc="stop when the tangent norm is below it; norms <= tol leave the direction mean"),
        ],
        "min_models": 1,
        "max_models": None,
        "random": False,
        "doc": "equal-weight Karcher mean of the models' directions on the unit sphere, "
        "scaled by their mean norm",
        "fn": _karcher_fn,
    },
    {
        "name": "multislerp",
        "base": "optional",
        "params": [
            _param("weight", "REQUIRED", per_model=True,
                   doc="model's share in the spherical barycentre"),
            _param("normalize_weights", True, kind="bool", doc="divide the weights by their sum"),
            _param("eps", 1e-8, low=0.0, doc="numerical floor for norms"),
        ],
        "min_models": 1,
        "max_models": None,
        "random": False,
        "doc": "spherical barycentric interpolation of several models "
        "(of their task vectors when a base is given)",
        "fn": _multislerp_fn,
    },
    {
        "name": "nearswap",
        "base": "required",
        "params": [
            _param("t", "REQUIRED", low=0.0,
                   doc="distance within which the model's value is taken; farther ones move towards "
                   "the base (weight t/|base-model|)"),
        ],
        "min_models": 1,
        "max_models": 1,
        "random": False,
        "doc": "take the model's value where it is near the base's, interpolate towards the base elsewhere",
        "fn": _nearswap_fn,
    },
    {
        "name": "sce",
        "base": "required",
        "params": [
            _param("int8_mask", False, kind="bool", doc="mergekit memory option; no numeric effect"),
            _param("select_topk", 1.0, low=0.0, high=1.0,
                   doc="fraction of elements (of those with nonzero variance across the task vectors) "
                   "kept, largest variance first"),
        ],
        "min_models": 1,
        "max_models": None,
        "random": False,
        "doc": "SCE: select high-variance elements, weight models by mean squared task vector, "
        "erase sign conflicts",
        "fn": _sce_fn,
    },
    {
        "name": "ram",
        "base": "required",
        "params": [
            _param("epsilon", 1e-5, low=0.0, doc="changes of at most epsilon count as unchanged"),
        ],
        "min_models": 1,
        "max_models": None,
        "random": False,
        "doc": "RAM: unique changes kept whole, changes shared by several models averaged",
        "fn": _ram_fn,
    },
    {
        "name": "ramplus_tl",
        "base": "required",
        "params": [
            _param("r", 0.1, low=0.0, doc="strength of the unique-change rescale"),
            _param("alpha", 0.2, low=0.0, doc="cap on the shared/unique ratio in the rescale"),
            _param("epsilon", 1e-5, low=0.0, low_open=True,
                   doc="changes of at most epsilon count as unchanged; also the floor of the unique "
                   "count (0 makes a model without changes 0/0 = NaN everywhere, in mergekit too)"),
        ],
        "min_models": 1,
        "max_models": None,
        "random": False,
        "doc": "RAM+ (tensor-local): RAM with unique changes scaled by 1 + r*min(shared/unique, alpha)",
        "fn": _ramplus_tl_fn,
    },
]

MORE_ADAPTERS: dict[str, Callable[..., torch.Tensor]] = {row["name"]: row["fn"] for row in MORE_METHOD_ROWS}
