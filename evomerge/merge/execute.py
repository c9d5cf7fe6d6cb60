"""Compute one planned output tensor from its inputs: vocab policy, seeding, then the pure merge function."""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

from evomerge.errors import ConfigError, ModelLoadError
from evomerge.merge.plan import MergePlan, TensorPlan
from evomerge.merge.registry import merge_tensor

Fetch = Callable[[str, str], torch.Tensor]
"""fetch(model_ref, tensor_name) -> tensor in the compute dtype on the compute device."""


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed independent of merge order, so a recipe's DARE masks reproduce anywhere."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(seed: int | None, name: str, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(tensor_seed(0 if seed is None else seed, name))
    return gen


def compute_tensor(
    plan: MergePlan,
    tp: TensorPlan,
    fetch: Fetch,
    *,
    params: dict[str, Any] | None = None,
    aligners: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The merged value of `tp`; `params` overrides the recipe's resolution (the resident merger passes its own).

    `aligners[model](rows, fill_rows)` maps a model's embedding rows into the target vocabulary (policy 'align').
    `rows`: (row ids, values) written over the merged rows (`evomerge.token_rows`).
    """
    out = _merged(plan, tp, fetch, params, aligners)
    return out if rows is None else out.index_copy(0, rows[0], rows[1].to(out.dtype))


def _merged(plan: MergePlan, tp: TensorPlan, fetch: Fetch, params: dict[str, Any] | None,
            aligners: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None) -> torch.Tensor:
    if tp.vocab == "keep_target":
        return fetch(plan.target, tp.out_name)
    tensors = [fetch(inp.model, inp.name) for inp in tp.inputs]
    if tp.vocab == "align":
        tensors = align_vocab(plan, tp, tensors, fetch, aligners or {})
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        models = ", ".join(f"{inp.model} {tuple(t.shape)}" for inp, t in zip(tp.inputs, tensors))
        if tp.kind.value in ("embed", "lm_head"):
            raise ConfigError(
                f"vocabulary sizes differ for {tp.out_name}: {models}",
                key="evomerge.embeddings", allowed="keep_target, align",
            )
        raise ModelLoadError(f"tensor {tp.out_name} has different shapes: {models}")
    base = tensors[tp.base_index] if tp.base_index is not None else None
    others = [t for i, t in enumerate(tensors) if i != tp.base_index]
    if params is None:
        params = plan.resolve(tp)
    device = tensors[0].device
    generator = make_generator(plan.recipe.options.seed, tp.out_name, device)
    return merge_tensor(plan.method, base, others, params, generator=generator)


def align_vocab(plan: MergePlan, tp: TensorPlan, tensors: list[torch.Tensor], fetch: Fetch,
                aligners: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]) -> list[torch.Tensor]:
    """Rows of every model placed at the target's token ids; missing rows come from the base (delta 0) or target.

    Used by `compute_tensor` and by the resident merger (which aligns once per run), so both merge the same rows."""
    target_rows = fetch(plan.target, tp.out_name)
    base_i = tp.base_index
    aligned: list[torch.Tensor | None] = [None] * len(tensors)
    if base_i is not None:
        model = tp.inputs[base_i].model
        aligned[base_i] = aligners[model](tensors[base_i], target_rows) if model in aligners else tensors[base_i]
    fill_default = target_rows
    if base_i is not None:
        base_rows = aligned[base_i]
        assert base_rows is not None
        fill_default = base_rows
    for i, (inp, rows) in enumerate(zip(tp.inputs, tensors)):
        if i == base_i:
            continue
        aligned[i] = aligners[inp.model](rows, fill_default) if inp.model in aligners else rows
    return [t for t in aligned if t is not None]
