"""Spherical means of several models as pure tensor functions, numerically equal to mergekit 0.1.5:
``karcher`` (the Riemannian mean of the models' directions) and ``multislerp`` (barycentric
interpolation on the sphere through the tangent space at the weighted mean direction).

Like ``methods``, nothing here knows about YAML or files: each function takes the tensors of ONE
parameter and resolved scalars (per-model values as sequences aligned with ``tensors``) and returns
the merged tensor. Reference: ``mergekit/merge_methods/{karcher,multislerp}.py`` (0.1.5). Each
function first promotes its inputs to a common dtype, as mergekit's ``align_dtype`` does, and then
repeats mergekit's arithmetic operation by operation (same ops, order and dtypes; Python scalars
where mergekit has Python scalars, 0-dim tensors where it has 0-dim tensors), so results are
bit-identical to mergekit's kernels in float32 and bfloat16 on the same device. The registry row of
each (parameters, base policy, model counts) is in ``registry.METHODS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from evomerge.merge.methods import promote as _promote

__all__ = ["SPHERICAL_DIFFERENCES_FROM_MERGEKIT", "karcher", "multislerp"]

SPHERICAL_DIFFERENCES_FROM_MERGEKIT: list[str] = [
    "karcher merges every input it is given and ignores the base policy, in mergekit as here: a recipe "
    "with base_model merges the base as one more equally weighted model (the plan passes it among the "
    "models; mergekit's planner adds it to the sources likewise). Not a difference, a trap worth naming.",
]


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
