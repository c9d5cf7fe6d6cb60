"""Merge methods that choose, element by element, which model's change to keep, as pure tensor
functions numerically equal to mergekit 0.1.5: ``arcee_fusion`` (a model's change where its
importance is an upper outlier), ``nearswap`` (the model's value where it is near the base's), ``sce``
(select high-variance elements, weight models by their mean squared change, erase sign conflicts),
``ram`` and ``ramplus_tl`` (unique changes kept whole, shared ones averaged).

Like ``methods``, nothing here knows about YAML or files: each function takes the tensors of ONE
parameter and resolved scalars and returns the merged tensor. Reference: ``mergekit/merge_methods/
{arcee_fusion,nearswap,sce,ram}.py`` (0.1.5). Each function first promotes its inputs to a common
dtype, as mergekit's ``align_dtype`` does, and then repeats mergekit's arithmetic operation by
operation, so results are bit-identical to mergekit's kernels in float32 and bfloat16 on the same
device, including the output dtype (two kernels return float32 for half-precision inputs, see
``SELECTIVE_DIFFERENCES_FROM_MERGEKIT``). The registry row of each is in ``registry.METHODS``.

Randomness: only ``arcee_fusion`` draws random numbers, and only for tensors of more than 1,000,000
elements (a quantile estimate from a sample drawn with replacement). It draws from an explicit
``torch.Generator``; ``generator=None`` uses the global generator exactly as mergekit does, and a
generator seeded with ``s`` draws what mergekit draws after ``torch.manual_seed(s)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from evomerge.merge.methods import promote as _promote

__all__ = [
    "SELECTIVE_DIFFERENCES_FROM_MERGEKIT",
    "ARCEE_FUSION_SAMPLE_SIZE",
    "arcee_fusion",
    "arcee_fusion_importance",
    "nearswap",
    "sce",
    "sce_mask",
    "sce_weight",
    "ram",
    "ramplus_tl",
]

SELECTIVE_DIFFERENCES_FROM_MERGEKIT: list[str] = [
    "arcee_fusion and ramplus_tl: mergekit's kernels return float32 for bfloat16/float16 inputs "
    "(arcee_fusion multiplies by a float32 mask, ramplus_tl by a float32 lambda) and mergekit writes "
    "that float32 tensor unless out_dtype is set. The pure functions here return exactly that; the "
    "registry adapters cast the result back to the inputs' dtype (evomerge's rule that a merged "
    "tensor has its inputs' dtype), which equals mergekit run with out_dtype set to that dtype.",
    "arcee_fusion on tensors of more than 1,000,000 elements estimates its quantiles from a random "
    "sample; evomerge draws it from an explicit torch.Generator (mergekit: the global generator). "
    "Seeded with the same number the draws, and so the results, are identical.",
    "sce with no models besides the base returns the base (as mergekit does); the registry row still "
    "asks for at least one model.",
]

ARCEE_FUSION_SAMPLE_SIZE = 1_000_000  # mergekit's _QUANTILE_SAMPLE_SIZE


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
