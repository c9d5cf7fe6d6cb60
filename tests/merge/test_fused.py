"""The fused merge pass equals mergekit's eager maths (``registry.merge_tensor``) bit for bit, eager and compiled.

Data: float32 and bfloat16 tensors with small deltas (as fine-tunes have), so magnitudes tie at TIES thresholds in
both dtypes and the tie fixups run (asserted). Compiled checks use a few small tensors: one compile per kernel
variant and dtype (inductor's on-disk cache makes reruns quick).
"""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.candidate import HeldTensor, _l1, della_rank_table, merge_gta, merge_linear
from evomerge.merge.fused import FusedKernels, compile_available
from evomerge.merge.registry import merge_tensor, resolve_params
from evomerge.merge.thresholds import GridThresholds

DTYPES = [torch.float32, torch.bfloat16]
GTA = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs_ties"]


def make(shape, dtype, n=3, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [(base + scale * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]
    return base.to(dtype), models


def params_for(method, densities=(0.3, 0.55, 0.8), **extra):
    p = {"weight": [0.7, 1.1, -0.4], "lambda": 0.9, **extra}
    if method not in ("task_arithmetic", "linear"):
        p["density"] = list(densities)
    if method.startswith("della"):
        p["epsilon"] = 0.1
    if method == "linear":
        p.pop("lambda")
    return p


def reference(method, base, models, params, seed=5):
    return merge_tensor(method, base, models, params, generator=torch.Generator().manual_seed(seed))


def held_for(method, base, models, ties="exact", layout="auto"):
    deltas = [m - base for m in models]
    return HeldTensor(
        base=base, deltas=deltas,
        tables=[GridThresholds(d, ties=ties, layout=layout) for d in deltas] if method == "ties" else None,
        della=[della_rank_table(d) for d in deltas] if method.startswith("della") else None,
        l1=[_l1(d) for d in deltas] if method.startswith(("dare", "della")) else None)


def ours(kernels, method, base, models, params, seed=5, ties="exact", layout="auto"):
    out = torch.empty_like(base)
    resolved = resolve_params(method, params, len(models))
    if method == "linear":
        merge_linear(kernels, out, models, resolved)
    else:
        merge_gta(kernels, out, held_for(method, base, models, ties, layout), method, resolved,
                  torch.Generator().manual_seed(seed))
    return out


@pytest.fixture(scope="module")
def eager():
    return FusedKernels("eager")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", GTA + ["linear"])
def test_eager_equals_mergekit_maths(eager, method, dtype):
    base, models = make((48, 200), dtype)  # 9600 elements: several eager chunks? no: one; see the chunk test
    for extra in ({}, {"normalize": True}, {"normalize": False, "lambda": 1.0}):
        if method == "linear" and "lambda" in extra:
            continue
        params = params_for(method, **extra)
        assert torch.equal(ours(eager, method, base, models, params), reference(method, base, models, params)), extra


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["lists", "ranks"])
def test_ties_ties_are_fixed_exactly_and_off_grid_densities_sort(eager, dtype, layout):
    base, models = make((64, 96), dtype, scale=0.001)
    tables = [GridThresholds(m - base, layout=layout) for m in models]
    if layout == "lists":
        assert any(t.fixups is not None and t.fixups.numel() for t in tables)  # the tie case is real here
    assert all(t.dense == (layout == "ranks") for t in tables)
    for dens in ([0.3, 0.55, 0.8], [0.001, 0.999, 1.0], [0.12345, 0.5, 0.6789]):  # the last: off the grid
        params = params_for("ties", densities=dens)
        out = torch.empty_like(base)
        held = HeldTensor(base=base, deltas=[m - base for m in models], tables=tables)
        merge_gta(eager, out, held, "ties", resolve_params("ties", params, 3), None)
        assert torch.equal(out, reference("ties", base, models, params)), dens


def test_auto_layout_lists_for_few_ties_ranks_for_many():
    f32, f32_models = make((256, 256), torch.float32, scale=0.05)
    bf16, bf16_models = make((64, 96), torch.bfloat16)
    few = GridThresholds(f32_models[0] - f32)
    many = GridThresholds(bf16_models[0] - bf16)
    assert not few.dense and few.nbytes()["ranks"] < 0.25 * 4 * f32.numel()
    assert many.dense and many.nbytes()["ranks"] == 4 * bf16.numel()


def test_index_tie_break_differs_only_at_tied_thresholds(eager):
    base, models = make((64, 96), torch.bfloat16, scale=0.001)
    params = params_for("ties")
    out, ref = ours(eager, "ties", base, models, params, ties="index"), reference("ties", base, models, params)
    differs = out != ref
    assert differs.any()  # bf16: ties at the thresholds, broken by flat index here
    at_threshold = torch.zeros_like(differs)
    for m, dens in zip(models, params["density"]):
        t = GridThresholds(m - base, ties="index")
        at_threshold |= (m - base).abs().float() == t.lookup(dens).threshold
    assert bool((~differs | at_threshold).all())


def test_chunked_eager_pass_spans_chunks(eager):
    from evomerge.merge import fused

    base, models = make((3 * fused.CHUNK + 123,), torch.bfloat16)
    for method in ("ties", "dare_ties"):
        params = params_for(method)
        assert torch.equal(ours(eager, method, base, models, params), reference(method, base, models, params))


def test_dare_masks_follow_the_seed(eager):
    base, models = make((32, 64), torch.float32)
    params = params_for("dare_ties")
    a = ours(eager, "dare_ties", base, models, params, seed=1)
    b = ours(eager, "dare_ties", base, models, params, seed=2)
    assert not torch.equal(a, b)
    assert torch.equal(a, reference("dare_ties", base, models, params, seed=1))


def test_nonfinite_is_reported(eager):
    base, models = make((16, 16), torch.float32)
    out = torch.empty_like(base)
    resolved = resolve_params("task_arithmetic", {"weight": [1e38, 1e38, 1e38], "lambda": 1e38}, 3)
    assert not merge_gta(eager, out, held_for("task_arithmetic", base, models), "task_arithmetic", resolved, None)


@pytest.fixture(scope="module")
def compiled():
    if not compile_available():
        pytest.skip("torch.compile is not available")
    return FusedKernels("compile")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,layout", [("ties", "lists"), ("ties", "ranks"), ("dare_ties", None),
                                           ("linear", None)])
def test_compiled_equals_mergekit_maths(compiled, method, layout, dtype):
    """Kernel variants: TIES by threshold (+ tie fixups) and by rank table, DARE (masked deltas), linear."""
    base, models = make((64, 96), dtype, scale=0.001)
    params = params_for(method)
    out = ours(compiled, method, base, models, params, layout=layout or "auto")
    assert torch.equal(out, reference(method, base, models, params))
    base2, models2 = make((333,), dtype, seed=1)  # another shape and rank: no recompile (dynamic shapes)
    out2 = ours(compiled, method, base2, models2, params, layout=layout or "auto")
    assert torch.equal(out2, reference(method, base2, models2, params))
    assert compiled.mode == "compile"
