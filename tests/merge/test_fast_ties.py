"""fast_ties: precomputed magnitude thresholds give the same TIES merge as
``methods.ties`` (mergekit's argsort per merge), differing only among elements of
equal magnitude at the threshold."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.fast_ties import MagnitudeThresholds, ties_merge_fast
from evomerge.merge.registry import merge_tensor


def ties(base, models, weights, densities, *, normalize=None, lambda_=None):
    """TIES through the registry (mergekit's defaults), as the recipe engine calls it."""
    params = {"weight": list(weights), "density": list(densities)}
    if normalize is not None:
        params["normalize"] = normalize
    if lambda_ is not None:
        params["lambda"] = lambda_
    return merge_tensor("ties", base, models, params)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(shape, dtype, n=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(n)]
    base = base.to(dtype).to(device)
    models = [m.to(dtype).to(device) for m in models]
    return base, models, [m - base for m in models]


def topk_mask(delta, density):
    """mergekit's keep-mask: argsort of |delta| (float32 on CPU), first k."""
    k = max(1, int(density * delta.numel()))
    w = delta.abs().reshape(-1)
    w = w.float() if w.device.type == "cpu" else w
    m = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    m[torch.argsort(w, descending=True)[:k]] = True
    return m.reshape(delta.shape)


GRID = [0.001, 0.137, 0.3, 0.5, 0.731, 0.999, 1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(200,), (64, 96)])
def test_masks_equal_topk_on_float32(shape, device):
    _, _, deltas = make(shape, torch.float32, n=1, device=device)
    th = MagnitudeThresholds(deltas[0])
    for d in GRID:
        assert th.on_grid(d)
        assert torch.equal(th.mask(d), topk_mask(deltas[0], d)), d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize,lambda_", [(True, 1.0), (False, 1.0), (True, 0.6)])
def test_identical_to_methods_ties_float32(normalize, lambda_, device):
    base, models, deltas = make((64, 96), torch.float32, device=device)
    th = [MagnitudeThresholds(d) for d in deltas]
    weights = [0.7, 1.1, -0.4]
    for densities in ([0.3, 0.5, 0.9], [0.001, 0.25, 1.0], [0.8, 0.8, 0.8]):
        ref = ties(base, models, weights, densities, normalize=normalize, lambda_=lambda_)
        out = ties_merge_fast(base, deltas, th, weights, densities, normalize=normalize, lambda_=lambda_)
        assert torch.equal(out, ref), densities


def test_off_grid_density_still_exact():
    base, models, deltas = make((50, 37), torch.float32)
    th = [MagnitudeThresholds(d, steps=100) for d in deltas]
    densities = [0.12345, 0.4321, 0.9]
    assert not th[0].on_grid(0.12345)
    ref = ties(base, models, [1.0, 0.5, 0.8], densities)
    assert torch.equal(ties_merge_fast(base, deltas, th, [1.0, 0.5, 0.8], densities), ref)


def test_bfloat16_index_tie_break_keeps_k_of_the_same_magnitudes():
    """bf16 deltas are quantized, so many share the threshold magnitude: exactly k
    are kept, with the same magnitudes as top-k; only which tied ones differs."""
    base, models, deltas = make((96, 128), torch.bfloat16)
    d = deltas[0]
    th = MagnitudeThresholds(d)
    a = d.abs().float()
    saw_ties = False
    for dens in (0.1, 0.3, 0.5, 0.9):
        m, ref = th.mask(dens), topk_mask(d, dens)
        assert int(m.sum()) == int(ref.sum()) == th.k(dens)
        assert torch.equal(a[m].sort().values, a[ref].sort().values)
        if not torch.equal(m, ref):
            saw_ties = True
            thr, _ = th.threshold(dens)
            assert bool((a[m != ref] == thr).all())  # differences only at the threshold
    assert saw_ties  # the case is real for bf16


def test_bfloat16_merge_differs_only_where_a_delta_ties_its_threshold():
    base, models, deltas = make((96, 128), torch.bfloat16)
    th = [MagnitudeThresholds(d) for d in deltas]
    weights, densities = [0.7, 1.1, 0.4], [0.3, 0.5, 0.8]
    ref = ties(base, models, weights, densities)
    out = ties_merge_fast(base, deltas, th, weights, densities)
    differs = out != ref
    at_threshold = torch.zeros_like(differs)
    for d, t, dens in zip(deltas, th, densities):
        at_threshold |= d.abs().float() == t.threshold(dens)[0]
    assert bool((~differs | at_threshold).all())


def test_bfloat16_argsort_tie_break_is_bit_identical():
    base, models, deltas = make((96, 128), torch.bfloat16)
    th = [MagnitudeThresholds(d, tie_break="argsort") for d in deltas]
    weights = [0.7, 1.1, -0.4]
    for densities in ([0.3, 0.5, 0.9], [0.05, 0.6, 1.0]):
        ref = ties(base, models, weights, densities)
        assert torch.equal(ties_merge_fast(base, deltas, th, weights, densities), ref)


def test_writes_in_place_into_out():
    base, models, deltas = make((32, 16), torch.float32)
    th = [MagnitudeThresholds(d) for d in deltas]
    out = torch.empty_like(base)
    ptr = out.data_ptr()
    res = ties_merge_fast(base, deltas, th, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], out=out)
    assert res is out and out.data_ptr() == ptr
    assert torch.equal(out, ties(base, models, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]))


def test_zero_density_and_zero_weight_drop_the_model():
    base, models, deltas = make((40,), torch.float32)
    th = [MagnitudeThresholds(d) for d in deltas]
    out = ties_merge_fast(base, deltas, th, [1.0, 0.0, 1.0], [0.5, 0.5, 0.0])
    ref = ties(base, models[:1], [1.0], [0.5])
    assert torch.equal(out, ref)
    assert torch.equal(th[0].mask(0.0), torch.zeros(40, dtype=torch.bool))
