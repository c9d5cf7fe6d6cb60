"""Merge methods as pure functions on tensors, numerically equal to mergekit 0.1.5.

Nothing here knows about YAML, files, runs or optimizers: every function takes the
tensors of ONE parameter (the base and the models, already of one shape) plus
resolved scalars, and returns the merged tensor. Per-model values (weights,
densities, gammas, epsilons) are sequences aligned with ``tensors``.

Reference: ``mergekit/merge_methods/{generalized_task_arithmetic,linear,slerp,
model_stock,nuslerp,passthrough}.py`` and ``mergekit/sparsify.py``. The arithmetic
below mirrors theirs operation by operation (same dtypes, same op order) so that
results agree bit for bit in float32 and bfloat16 on the same device:

- task arithmetic family (GTA): computed in the (promoted) dtype of the inputs,
  weights are cast to that dtype, the result is cast back to the base's dtype;
- linear: float32 maths (float64 if the inputs are float64), cast back;
- slerp: float32 maths (float64 for float64 inputs), cast back;
- model_stock, nuslerp: in the inputs' dtype.

Randomness (DARE, DELLA) draws from an explicit ``torch.Generator``; with
``generator=None`` the global generator is used, exactly as mergekit does, and a
generator seeded with ``s`` gives the same numbers as ``torch.manual_seed(s)``
followed by mergekit's call.

Intentional differences from mergekit are listed in ``DIFFERENCES_FROM_MERGEKIT``.

Kept as one module on purpose: it mirrors mergekit's ``sparsify.py`` and its method files op by op,
so the two can be read side by side, and every method shares the sparsification and masking helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

__all__ = [
    "DIFFERENCES_FROM_MERGEKIT",
    "SPARSIFICATION_METHODS",
    "CONSENSUS_METHODS",
    "promote",
    "sparsify",
    "magnitude",
    "magnitude_outliers",
    "bernoulli",
    "della_magprune",
    "rescaled_masked_tensor",
    "get_mask",
    "linear",
    "generalized_task_arithmetic",
    "slerp",
    "nuslerp",
    "model_stock",
    "passthrough",
]

DIFFERENCES_FROM_MERGEKIT: list[str] = [
    "linear with normalize=true and weights summing to (nearly) zero: mergekit divides by "
    "the zero sum and writes inf/NaN into the model; evomerge divides by 1 instead "
    "(|sum| < 1e-8), the same rule mergekit itself uses for task arithmetic.",
    "DARE/DELLA randomness comes from an explicit torch.Generator that the caller seeds per "
    "candidate and per tensor (mergekit draws from the global generator). Seeded with the "
    "same number the draws are identical, so only the seeding differs, not the maths.",
    "TIES during the search (evomerge.merge.fast_ties, default tie_break='index'): among "
    "elements of exactly equal |delta| at the density threshold it keeps the lowest flat "
    "indices, where mergekit keeps whichever its unstable argsort puts first. Same count, "
    "same magnitudes; bit-identical on float32 deltas, a few tied positions differ on "
    "bf16 ones. tie_break='argsort' reproduces mergekit's choice exactly.",
    "breadcrumbs with gamma*numel < 1 (a version note, not a difference from 0.1.5): "
    "older mergekit releases sliced the sorted magnitudes "
    "as [n_bot:-n_top], an empty slice when n_top == 0, and zeroed the whole delta. "
    "mergekit 0.1.5 slices [n_bot:n_bot+target_n] and is already right (no outliers are "
    "removed); evomerge does the same and a test pins it, so a merge made with an older "
    "mergekit can differ from ours on small tensors (e.g. 1-D norms).",
]

SPARSIFICATION_METHODS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
CONSENSUS_METHODS = ("sum", "count")
RESCALE_NORMS = ("l1", "l2", "linf")


# --------------------------------------------------------------------------- dtypes
def promote(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast all inputs to their promoted dtype, as mergekit's ``align_dtype`` does."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _wide(dtype: torch.dtype) -> torch.dtype:
    """mergekit's 'full precision' for linear/slerp: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------- sparsification
def rescaled_masked_tensor(
    tensor: torch.Tensor, mask: torch.Tensor, norm: Optional[str], eps: float = 1e-7
) -> torch.Tensor:
    """``tensor * mask``, rescaled so its ``norm`` matches the unmasked tensor's.

    DARE's rescale is the L1 ratio ``|delta|_1 / |masked|_1`` (mergekit's current
    behaviour), not the paper's ``1/p``. Norms below ``eps`` skip the rescale.
    """
    masked = tensor * mask
    if norm is None:
        return masked
    if norm == "l1":
        before, after = tensor.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = tensor.norm(), masked.norm()
    elif norm == "linf":
        before, after = tensor.abs().max(), masked.abs().max()
    else:
        raise ValueError(f"unknown rescale norm {norm!r}; allowed: {RESCALE_NORMS}")
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(tensor: torch.Tensor, density: float, rescale_norm: Optional[str] = None) -> torch.Tensor:
    """Keep the ``k = max(1, int(density * numel))`` largest |values| (TIES trimming).

    Ties at the threshold are broken by ``torch.argsort`` exactly as mergekit does
    (|values| upcast to float32 on CPU), so the chosen elements are the same.
    """
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    w = tensor.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return rescaled_masked_tensor(tensor, mask.reshape_as(tensor), rescale_norm)


def magnitude_outliers(
    tensor: torch.Tensor,
    density: float,
    rescale_norm: Optional[str] = None,
    gamma: float = 0.01,
) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` share of largest |values|, then the smallest.

    ``target_n = int(density*n)`` elements are kept: those ranked
    ``[n_bot, n_bot + target_n)`` in ascending |value| with
    ``n_bot = max(0, n - target_n - int(gamma*n))``; when density + gamma > 1 the
    outlier removal shrinks so the density is still met. When ``gamma*n < 1`` no
    outliers are removed (``n_top == 0``) and the result equals plain magnitude
    trimming to ``int(density*n)`` elements. (Older mergekit sliced
    ``[n_bot:-n_top]``, which is empty for ``n_top == 0`` and zeroed the delta;
    0.1.5 and this function do not.)
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    target_n = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target_n - n_top)
    w = tensor.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    indices = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    mask[indices[n_bot : n_bot + target_n]] = 1
    return rescaled_masked_tensor(tensor, mask.reshape_as(tensor), rescale_norm)


def bernoulli(
    tensor: torch.Tensor,
    density: float,
    rescale_norm: Optional[str] = None,
    *,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """DARE: keep each element with probability ``density`` (then rescale).

    Works in the tensor's dtype except float32 for non-bf16 CPU tensors (torch has
    no CPU float16 bernoulli), as mergekit does.
    """
    if density >= 1:
        return tensor
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        work_dtype = tensor.dtype
    else:
        work_dtype = torch.float32
    mask = torch.bernoulli(
        torch.full_like(tensor, fill_value=density, dtype=work_dtype), generator=generator
    )
    return rescaled_masked_tensor(tensor.to(work_dtype), mask, rescale_norm).to(tensor.dtype)


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    rescale_norm: Optional[str] = None,
    *,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with the |value| rank in a row.

    Per row (1-D tensors are one row) the element of rank r gets
    ``p = density - epsilon + 2*epsilon*(r - 1)/(n - 1)``; ``density ± epsilon`` must
    lie strictly inside (0, 1) (ValueError otherwise, as in mergekit).
    """
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    orig_shape = tensor.shape
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    work_dtype = (
        tensor.dtype if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 else torch.float32
    )
    if tensor.dim() < 2:
        tensor = tensor.unsqueeze(0)
    magnitudes = tensor.abs()
    sorted_indices = torch.argsort(magnitudes, dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(work_dtype) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(work_dtype)
    res = rescaled_masked_tensor(tensor.to(work_dtype), mask, rescale_norm)
    return res.to(tensor.dtype).reshape(orig_shape)


def sparsify(
    delta: torch.Tensor,
    density: float,
    method: str,
    *,
    rescale_norm: Optional[str] = None,
    gamma: Optional[float] = None,
    epsilon: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Sparsify a task vector: 'magnitude' (TIES), 'random' (DARE),
    'magnitude_outliers' (breadcrumbs, gamma default 0.01 as in mergekit's method
    spec), 'della_magprune' (DELLA, epsilon default 0.15)."""
    if method == "magnitude":
        return magnitude(delta, density, rescale_norm)
    if method == "random":
        return bernoulli(delta, density, rescale_norm, generator=generator)
    if method == "magnitude_outliers":
        return magnitude_outliers(delta, density, rescale_norm, gamma=0.01 if gamma is None else gamma)
    if method == "della_magprune":
        return della_magprune(
            delta, density, 0.15 if epsilon is None else epsilon, rescale_norm, generator=generator
        )
    raise ValueError(f"unknown sparsification method {method!r}; allowed: {SPARSIFICATION_METHODS}")


# ------------------------------------------------------------------ task arithmetic
def get_mask(delta: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election over stacked (weighted) deltas ``[models, ...]``.

    'sum': the majority sign is the sign of the summed deltas; 'count': of the
    summed signs. Zero counts as positive. Returns a bool mask: the model's sign
    agrees with the majority (zeros never agree, so they leave the divisor).
    """
    sign = delta.sign()
    if method == "sum":
        majority = (delta.sum(dim=0) >= 0).to(delta.dtype) * 2 - 1
    elif method == "count":
        majority = (sign.sum(dim=0) >= 0).to(delta.dtype) * 2 - 1
    else:
        raise ValueError(f"unknown consensus method {method!r}; allowed: {CONSENSUS_METHODS}")
    return sign == majority


def _per_model(values: Optional[Sequence[float]], n: int, default: Optional[float], name: str) -> list:
    if values is None:
        return [default] * n
    if isinstance(values, (int, float)):
        return [float(values)] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} values (one per model), got {len(values)}")
    return values


def generalized_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Optional[Sequence[float]] = None,
    *,
    sparsification: Optional[str],
    consensus: Optional[str],
    normalize: bool,
    lambda_: float = 1.0,
    rescale: bool = False,
    gammas: Optional[Sequence[float]] = None,
    epsilons: Optional[Sequence[float]] = None,
    int8_mask: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge for one tensor.

    ``delta_i = sparsify(model_i - base) * w_i``; with consensus, the merged delta is
    ``sum(delta_i * agree_i) / sum(w_i * agree_i)`` (zero divisor -> 1), without it
    ``sum(delta_i) / sum(w_i)`` (|divisor| < 1e-8 -> 1); division only when
    ``normalize``; then ``* lambda_`` and ``+ base``. All in the inputs' dtype.
    ``int8_mask`` is accepted for config parity; it only changes mergekit's memory
    use, never the numbers.
    """
    del int8_mask
    if not tensors:
        return base
    base, *tensors = promote(base, *tensors)
    n = len(tensors)
    weights = _per_model(weights, n, None, "weights")
    densities = _per_model(densities, n, 1.0, "densities")
    gammas = _per_model(gammas, n, None, "gammas")
    epsilons = _per_model(epsilons, n, None, "epsilons")

    deltas = base.new_empty((n, *base.shape))
    for i, t in enumerate(tensors):
        delta = t - base
        if sparsification:
            delta = sparsify(
                delta,
                densities[i],
                sparsification,
                rescale_norm="l1" if rescale else None,
                gamma=gammas[i],
                epsilon=epsilons[i],
                generator=generator,
            )
        deltas[i] = delta
        del delta

    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)

    if consensus:
        mask = get_mask(deltas, consensus)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


# ------------------------------------------------------------------------- linear
def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Weighted average ``sum(w_i * t_i) / sum(w_i)`` in float32 (float64 stays).

    Unlike mergekit, a (near) zero weight sum divides by 1 instead of producing
    inf/NaN (see DIFFERENCES_FROM_MERGEKIT).
    """
    tensors = promote(*tensors)
    first = tensors[0]
    if not first.is_floating_point():
        raise TypeError("linear merging requires floating-point tensors")
    dtype = _wide(first.dtype)
    w = torch.tensor(list(weights), dtype=dtype, device=first.device)
    if w.numel() != len(tensors):
        raise ValueError(f"weights: expected {len(tensors)} values, got {w.numel()}")
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, w.unbind(0)):
        result.addcmul_(tensor, coefficient)
    if normalize:
        denominator = w.sum()
        if denominator.abs() < 1e-8:
            denominator = torch.ones_like(denominator)
        result.div_(denominator)
    return result.to(first.dtype)


# -------------------------------------------------------------------------- slerp
_CHUNK_ELEMENTS = 1024 * 1024  # mergekit's chunk size; norms are taken per chunk like theirs


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t=0, the base) to ``v1`` (t=1) over the
    whole flattened tensor, in float32 (float64 stays). When the normalized vectors
    have ``|dot| > dot_threshold`` it is a plain lerp of the originals. Norms below
    ``eps`` count as 1. Mirrors mergekit's chunked evaluation order.
    """
    v0, v1 = promote(v0, v1)
    dtype = _wide(v0.dtype)
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor(float(t), dtype=dtype, device=v0.device).reshape(1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    chunk = _CHUNK_ELEMENTS
    norm_a_parts, norm_b_parts = [], []
    for s in range(0, a.shape[1], chunk):
        norm_a_parts.append(torch.linalg.vector_norm(a[:, s : s + chunk].to(dtype), dim=1, keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(b[:, s : s + chunk].to(dtype), dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot_parts = []
    for s in range(0, a.shape[1], chunk):
        x = a[:, s : s + chunk].to(dtype) / norm_a
        y = b[:, s : s + chunk].to(dtype) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(lin, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(lin, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in range(0, a.shape[1], chunk):
        result[:, s : s + chunk] = coef_a * a[:, s : s + chunk].to(dtype) + coef_b * b[:, s : s + chunk].to(dtype)
    return result.reshape(v0.shape)


def nuslerp(
    base: Optional[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """mergekit's NuSLERP of two models, ``t = w1 / (w0 + w1)`` (0.5 if the sum is ~0);
    with a base, it interpolates the task vectors and adds them to the base."""
    if len(tensors) != 2:
        raise ValueError("nuslerp needs exactly two models")
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is not None:
        base, t0, t1 = promote(base, *tensors)
        return base + _nuslerp(t, t0 - base, t1 - base, dim=0 if row_wise else -1, eps=eps, flatten=flatten)
    t0, t1 = promote(*tensors)
    return _nuslerp(t, t0, t1, dim=0 if row_wise else -1, eps=eps, flatten=flatten)


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, eps: float, flatten: bool) -> torch.Tensor:
    out_shape = v0.shape

    def _normalize(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u, v1_u = _normalize(v0), _normalize(v1)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


# --------------------------------------------------------------------- model stock
def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: interpolate between the base and the models' average with
    ``t = k*cos / (1 + (k-1)*cos)``, cos the mean pairwise cosine of the task vectors
    (per row when ``filter_wise``). A singular denominator keeps the base. Needs at
    least two models. Computed in the inputs' dtype, like mergekit.
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    w_0, *ws = promote(base, *tensors)
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w_0 = w_0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1 :]:
            norm_product = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cos_thetas.append(((oa * ob).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


def passthrough(tensor: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """One model's tensor, optionally multiplied by ``scale`` (layer stacking)."""
    return tensor if scale is None else tensor * scale
