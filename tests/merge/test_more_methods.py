"""Bit-for-bit equivalence of ``evomerge.merge.methods_selective`` / ``methods_spherical`` (and their registry
rows and adapters) with mergekit 0.1.5.

mergekit is called through its own merge-method objects
(``mergekit.merge_methods.registry.get(name)([group], parameters=...)``, which align
dtypes like a real merge) and, where it exposes them, its inner tensor functions
(``karcher_merge_tensors``, ``sce_mask``, ``sce_weight``). Every comparison is bitwise
(same dtype, same bits; NaN where mergekit has NaN), in float32 and bfloat16.
"""

from __future__ import annotations

import math

import pytest
import torch
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import BasePolicy, ParameterScope, TensorGroup
from mergekit.merge_methods.karcher import karcher_merge_tensors as mk_karcher_tensors
from mergekit.merge_methods.sce import sce_mask as mk_sce_mask
from mergekit.merge_methods.sce import sce_weight as mk_sce_weight

from evomerge.merge import methods_selective as S
from evomerge.merge import methods_spherical as P
from evomerge.merge.registry import METHODS, resolve_params

NEW = ["arcee_fusion", "karcher", "multislerp", "nearswap", "sce", "ram", "ramplus_tl"]
ADAPTERS = {name: METHODS[name].fn for name in NEW}

# 1-D norm, 2-D projection, embedding-like (vocab rows x hidden); >1M elements only
# where size changes the maths (arcee_fusion's sampled quantiles).
SHAPES = [(96,), (24, 40), (4000, 32)]
DTYPES = [torch.float32, torch.bfloat16]
BIG_SHAPE = (1001, 1000)  # 1,001,000 elements > mergekit's 1,000,000 quantile sample


# ------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(shape, dtype, n=3, seed=0, scale=0.05, same_every=0):
    """base ~ N(0,1), models = base + scale*N(0,1); with ``same_every=k`` every k-th
    element of every model equals the base's (zero task vector, zero variance)."""
    g = _gen(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n):
        m = base + scale * torch.randn(shape, generator=g)
        if same_every:
            m.view(-1)[::same_every] = base.view(-1)[::same_every]
        models.append(m)
    return base.to(dtype), [m.to(dtype) for m in models]


def diverse_inputs(shape, dtype, n=3, seed=0):
    """Independent directions of different norms (large angles: Karcher steps matter)."""
    g = _gen(seed)
    return [((1.0 + i) * torch.randn(shape, generator=g)).to(dtype) for i in range(n)]


def sparse_inputs(shape, dtype, n=3, seed=0, keep=0.45):
    """Models that each change a random subset of the base (RAM's unique/shared split),
    with changes of ~0.05 there and sub-epsilon jitter (1e-7) elsewhere."""
    g = _gen(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n):
        changed = torch.rand(shape, generator=g) < keep
        delta = torch.where(changed, 0.05 * torch.randn(shape, generator=g), 1e-7 * torch.randn(shape, generator=g))
        models.append(base + delta)
    return base.to(dtype), [m.to(dtype) for m in models]


def mergekit(name, base, models, params, **kwargs):
    tensors = ([base] if base is not None else []) + list(models)
    group = TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None)
    return mk_registry.get(name)([group], parameters=params, **kwargs)[0]


_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.float64: torch.int64}


def assert_bits(ours: torch.Tensor, ref: torch.Tensor):
    """Same shape, dtype and bits (signed zeros included); NaN exactly where ref has NaN."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    if not ref.is_floating_point():
        assert torch.equal(ours, ref)
        return
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan), "NaN positions differ"
    a = ours.contiguous().view(_INT_VIEW[ours.dtype])[~nan]
    b = ref.contiguous().view(_INT_VIEW[ref.dtype])[~nan]
    if not torch.equal(a, b):
        diff = (ours.double() - ref.double()).abs()[~nan]
        raise AssertionError(f"{int((a != b).sum())} elements differ, max abs diff {diff.max().item():.3g}")


# --------------------------------------------------------------------- arcee_fusion
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion(shape, dtype):
    base, models = make_inputs(shape, dtype, n=1, scale=0.3)
    ref = mergekit("arcee_fusion", base, models, {})
    ours = S.arcee_fusion(base, models[0])
    assert_bits(ours, ref)
    assert ours.dtype == torch.float32  # mergekit's float32 mask promotes bf16 results
    # the mask is neither empty nor full: both branches of the threshold are exercised
    assert not torch.equal(ours, base.float()) and not torch.equal(ours, models[0].float())
    # the adapter keeps the inputs' dtype = mergekit with out_dtype set
    adapted = ADAPTERS["arcee_fusion"](base, models, {}, None)
    assert_bits(adapted, mergekit("arcee_fusion", base, models, {}, out_dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_arcee_fusion_constant_importance_keeps_everything(dtype):
    """All importances equal the threshold: ``>=`` takes the model everywhere."""
    base = torch.zeros(64, dtype=dtype)
    model = (torch.arange(64) % 2 * 2 - 1).to(dtype) * 0.5  # |diff| constant, KL > 0 (one row)
    ref = mergekit("arcee_fusion", base, [model], {})
    assert_bits(S.arcee_fusion(base, model), ref)
    assert torch.equal(ref, model.float())


def test_arcee_fusion_identical_models_give_base():
    base, _ = make_inputs((16, 8), torch.float32, n=1)
    ref = mergekit("arcee_fusion", base, [base.clone()], {})
    assert_bits(S.arcee_fusion(base, base.clone()), ref)
    assert torch.equal(ref, base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arcee_fusion_sampled_quantiles_follow_the_seed(dtype):
    """Above 1M elements mergekit samples the quantiles from the global generator; a
    generator seeded s draws the same, and the draw really changes the result."""
    base, models = make_inputs(BIG_SHAPE, dtype, n=1, scale=0.5)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        ref = mergekit("arcee_fusion", base, models, {})
        torch.manual_seed(7)
        global_draw = S.arcee_fusion(base, models[0])
    assert_bits(S.arcee_fusion(base, models[0], generator=_gen(7)), ref)
    assert_bits(global_draw, ref)
    if dtype == torch.float32:
        assert not torch.equal(S.arcee_fusion(base, models[0], generator=_gen(8)), ref)


# -------------------------------------------------------------------------- karcher
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_karcher_defaults(shape, dtype):
    for n in (2, 3, 4):
        models = diverse_inputs(shape, dtype, n=n, seed=n)
        ref = mergekit("karcher", None, models, {})
        assert_bits(P.karcher(models), ref)
        assert_bits(ADAPTERS["karcher"](None, models, {"max_iter": 10, "tol": 1e-5}, None), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_karcher_iterations_and_tolerance(dtype):
    models = diverse_inputs((24, 40), dtype, n=3)
    seen = {}
    for max_iter in (0, 1, 2, 10, 50):
        for tol in (0.0, 1e-5, 1e-3, 0.5):
            params = {"max_iter": max_iter, "tol": tol}
            ref = mergekit("karcher", None, models, params)
            ours = P.karcher(models, max_iter=max_iter, tol=tol)
            assert_bits(ours, ref)
            seen[(max_iter, tol)] = ours
    # the steps and the early stop do change the bits (so the sweep is not vacuous)
    assert not torch.equal(seen[(0, 1e-5)], seen[(10, 1e-5)])
    assert not torch.equal(seen[(10, 0.5)], seen[(10, 1e-5)])
    if dtype == torch.float32:
        assert not torch.equal(seen[(1, 1e-5)], seen[(2, 1e-5)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_karcher_degenerate_inputs(dtype):
    x, y, z = diverse_inputs((12, 10), dtype, n=3, seed=5)
    zero = torch.zeros_like(x)
    cases = [
        [x, zero, y],  # zero norm: zero unit, left out of the direction mean, 0 in the scale
        [x, y * 1e-7, z],  # 0 < norm <= tol: nonzero unit but invalid
        [zero, zero],  # nothing valid: zeros
        [x, -x],  # antipodal: mean shorter than tol -> start at the first unit
        [x, x.clone(), y],  # identical pair: theta below tol is skipped
    ]
    for tensors in cases:
        for tol in (1e-5, 1e-3):
            ref = mergekit("karcher", None, tensors, {"tol": tol})
            assert_bits(P.karcher(tensors, tol=tol), ref)
    assert torch.equal(P.karcher([zero, zero]), zero)
    # one tensor comes back unchanged
    assert P.karcher([x]) is x and torch.equal(mergekit("karcher", None, [x], {}), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_karcher_weighted_alphas(dtype):
    """Non-uniform alphas not summing to one (mergekit's karcher_merge_tensors): the
    direction uses renormalized alphas over valid inputs, the scale the raw ones."""
    x, y, z = diverse_inputs((32, 6), dtype, n=3, seed=9)
    for tensors, alphas in (([x, y, z], [0.2, 0.5, 1.3]), ([x, torch.zeros_like(y), z], [0.7, 0.9, 0.4])):
        tensors = [t.to(dtype) for t in tensors]
        for max_iter in (0, 3, 10):
            ref = mk_karcher_tensors(tensors, alphas, max_iter=max_iter, tol=1e-5)
            assert_bits(P.karcher(tensors, alphas, max_iter=max_iter), ref)


# ------------------------------------------------------------------------ multislerp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp(shape, dtype, with_base):
    base, models = make_inputs(shape, dtype, n=3, scale=0.3)
    base_arg = base if with_base else None
    for weights in ([0.2, 0.5, 0.7], [0.25, 0.25, 0.5], [1.0, 0.0, 0.0], [0.8, -0.3, 0.5]):
        for normalize in (True, False):
            params = {"weight": weights, "normalize_weights": normalize}
            ref = mergekit("multislerp", base_arg, models, params)
            assert_bits(P.multislerp(base_arg, models, weights, normalize_weights=normalize), ref)
            adapted = ADAPTERS["multislerp"](base_arg, models, {**params, "eps": 1e-8}, None)
            assert_bits(adapted, ref)
    # normalizing matters when the weights do not sum to one
    assert not torch.equal(P.multislerp(base_arg, models, [0.2, 0.5, 0.7]),
                           P.multislerp(base_arg, models, [0.2, 0.5, 0.7], normalize_weights=False))


@pytest.mark.parametrize("dtype", DTYPES)
def test_multislerp_model_counts_and_eps(dtype):
    base, models = make_inputs((20, 12), dtype, n=4, scale=0.3, seed=3)
    for n, weights in ((2, [0.3, 0.9]), (4, [0.1, 0.2, 0.3, 0.4])):
        for eps in (0.0, 1e-8, 1e-3):
            for b in (base, None):
                params = {"weight": weights, "eps": eps}
                ref = mergekit("multislerp", b, models[:n], params)
                assert_bits(P.multislerp(b, models[:n], weights, eps=eps), ref)
    # one model: returned as is, with or without a base (mergekit ignores the base then)
    for b in (base, None):
        ref = mergekit("multislerp", b, models[:1], {"weight": [0.4]})
        assert_bits(P.multislerp(b, models[:1], [0.4]), ref)
        assert torch.equal(ref, models[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_multislerp_antipodal_and_zero_weight_sum(dtype):
    base, (x, y) = make_inputs((16, 9), dtype, n=2, seed=4)
    # two antipodal task vectors, equal weights: linear fallback (+ base)
    for b, pair in ((base, [base + (x - base), base - (x - base)]), (None, [x, -x])):
        ref = mergekit("multislerp", b, pair, {"weight": [0.5, 0.5]})
        assert_bits(P.multislerp(b, pair, [0.5, 0.5]), ref)
    # three inputs that cancel: both refuse
    with pytest.raises(ValueError):
        mergekit("multislerp", None, [x, -x, y], {"weight": [0.5, 0.5, 0.0]})
    with pytest.raises(ValueError, match="zero"):
        P.multislerp(None, [x, -x, y], [0.5, 0.5, 0.0])
    # weights summing to zero with normalize_weights: inf/NaN exactly like mergekit
    ref = mergekit("multislerp", base, [x, y], {"weight": [1.0, -1.0]})
    ours = P.multislerp(base, [x, y], [1.0, -1.0])
    assert not torch.isfinite(ref).all()
    assert_bits(ours, ref)


# -------------------------------------------------------------------------- nearswap
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap(shape, dtype):
    # every 5th element identical in base and model: |a-b| = 0 hits the 1e-6 floor
    base, models = make_inputs(shape, dtype, n=1, same_every=5)
    model = models[0]
    for t in (0.0, 1e-9, 1e-4, 0.01, 0.05, 1.0, 1e3, -0.5):
        ref = mergekit("nearswap", base, [model], {"t": t})
        assert_bits(S.nearswap(base, model, t), ref)
        assert_bits(ADAPTERS["nearswap"](base, [model], {"t": t}, None), ref)
    mixed = S.nearswap(base, model, 0.02)
    assert not torch.equal(mixed, base) and not torch.equal(mixed, model)
    assert torch.equal(S.nearswap(base, model, 0.0), base)
    assert torch.equal(S.nearswap(base, model, 1e3), model)


# ------------------------------------------------------------------------------- sce
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sce(shape, dtype):
    # every 7th element unchanged in all models: zero variance, not counted by select_topk
    base, models = make_inputs(shape, dtype, n=3, same_every=7)
    results = {}
    for select_topk in (1.0, 0.99, 0.9, 0.5, 0.1, 0.0, 1.5):
        for int8_mask in (False, True):
            params = {"select_topk": select_topk, "int8_mask": int8_mask}
            ref = mergekit("sce", base, models, params)
            ours = S.sce(base, models, select_topk=select_topk, int8_mask=int8_mask)
            assert_bits(ours, ref)
            assert_bits(ADAPTERS["sce"](base, models, params, None), ref)
            results[(select_topk, int8_mask)] = ours
        assert torch.equal(results[(select_topk, False)], results[(select_topk, True)])  # int8_mask: memory only
    assert not torch.equal(results[(0.5, False)], results[(1.0, False)])
    assert torch.equal(results[(0.0, False)], base)
    assert torch.equal(results[(1.5, False)], results[(1.0, False)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sce_model_counts(dtype):
    base, models = make_inputs((30, 20), dtype, n=4, seed=2)
    for n in (1, 2, 4):
        for select_topk in (1.0, 0.3):
            ref = mergekit("sce", base, models[:n], {"select_topk": select_topk})
            assert_bits(S.sce(base, models[:n], select_topk=select_topk), ref)
    # no models besides the base: the base (mergekit's contract allows it)
    assert_bits(S.sce(base, []), mergekit("sce", base, [], {}))
    # every model equals the base: zero weights -> uniform, zero task vector
    same = [base.clone(), base.clone()]
    assert_bits(S.sce(base, same), mergekit("sce", base, same, {}))


def test_sce_topk_count_is_a_float32_product():
    """k = int(count_nonzero * density) is a float32 tensor product in mergekit:
    100 nonzero variances at 0.57 give 57 (Python's 100 * 0.57 is 56.999...)."""
    base = torch.zeros(10, 10)
    models = [base + torch.randn(10, 10, generator=_gen(i)) for i in range(2)]
    tvs = torch.stack([m - base for m in models])
    mask = S.sce_mask(tvs, 0.57)
    assert int(mask.sum()) == 57 and int(100 * 0.57) == 56
    assert_bits(mask, mk_sce_mask(tvs, 0.57))
    assert_bits(S.sce(base, models, select_topk=0.57), mergekit("sce", base, models, {"select_topk": 0.57}))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sce_helpers(dtype):
    base, models = make_inputs((24, 40), dtype, n=3, same_every=3)
    tvs = torch.stack([m - base for m in models])
    assert_bits(S.sce_weight(tvs), mk_sce_weight(tvs))
    assert_bits(S.sce_weight(torch.zeros_like(tvs)), mk_sce_weight(torch.zeros_like(tvs)))
    for density in (0.0, 0.05, 0.5, 0.99, 1.0):
        for mask_dtype in (None, torch.int8, dtype):
            assert_bits(S.sce_mask(tvs, density, mask_dtype), mk_sce_mask(tvs, density, mask_dtype))
    # only nonzero-variance elements count: 1/3 of the elements have zero variance
    nonzero = int(torch.count_nonzero(torch.var(tvs, dim=0, unbiased=False)))
    assert nonzero < tvs[0].numel() and int(S.sce_mask(tvs, 0.5).sum()) == int(nonzero * torch.tensor(0.5))


# ------------------------------------------------------------------------------- ram
def _assert_all_overlap_counts(models, base, epsilon, n):
    counts = (torch.stack([m - base for m in models]).abs() > epsilon).sum(0)
    assert set(counts.unique().tolist()) == set(range(n + 1))  # 0, unique and shared all occur


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ram(shape, dtype):
    base, models = sparse_inputs(shape, dtype, n=3)
    _assert_all_overlap_counts(models, base, 1e-5, 3)
    for epsilon in (0.0, 1e-5, 0.02, 1.0):
        for n in (1, 2, 3):
            ref = mergekit("ram", base, models[:n], {"epsilon": epsilon})
            assert_bits(S.ram(base, models[:n], epsilon=epsilon), ref)
            assert_bits(ADAPTERS["ram"](base, models[:n], {"epsilon": epsilon}, None), ref)
    assert not torch.equal(S.ram(base, models, epsilon=1e-5), S.ram(base, models, epsilon=0.02))
    assert torch.equal(S.ram(base, models, epsilon=1e3), base)
    assert_bits(S.ram(base, []), mergekit("ram", base, [], {}))


# ------------------------------------------------------------------------ ramplus_tl
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ramplus_tl(shape, dtype):
    base, models = sparse_inputs(shape, dtype, n=3, seed=1)
    # the 4th model repeats the 2nd: it has no unique changes (its rho hits the epsilon floor)
    models = models + [models[1].clone()]
    for r, alpha in ((0.1, 0.2), (0.0, 0.2), (1.0, 5.0), (3.0, 0.0), (0.5, 1e3)):
        for epsilon in (1e-5, 0.02):
            for n in (1, 3, 4):
                params = {"r": r, "alpha": alpha, "epsilon": epsilon}
                ref = mergekit("ramplus_tl", base, models[:n], params)
                ours = S.ramplus_tl(base, models[:n], r=r, alpha=alpha, epsilon=epsilon)
                assert_bits(ours, ref)
                adapted = ADAPTERS["ramplus_tl"](base, models[:n], params, None)
                assert_bits(adapted, mergekit("ramplus_tl", base, models[:n], params, out_dtype=dtype))
    assert S.ramplus_tl(base, models).dtype == torch.float32  # mergekit's float32 lambda
    # r and alpha change the bits
    default = S.ramplus_tl(base, models[:3])
    assert not torch.equal(default, S.ramplus_tl(base, models[:3], r=1.0, alpha=5.0))
    assert not torch.equal(default, S.ramplus_tl(base, models[:3], alpha=0.5))
    if dtype == torch.float32:  # r = 0: lambda is exactly 1 (bf16: ram sums in bf16, ramplus_tl in float32)
        assert_bits(S.ramplus_tl(base, models[:3], r=0.0), S.ram(base, models[:3]))
    assert_bits(S.ramplus_tl(base, []), mergekit("ramplus_tl", base, [], {}))


def test_ramplus_tl_zero_epsilon_nan_like_mergekit():
    """epsilon = 0 with a model that changes nothing: 0/0 -> NaN everywhere, in
    mergekit too; the row's epsilon bound is open at 0 for that reason."""
    base, models = sparse_inputs((8, 8), torch.float32, n=1)
    tensors = [models[0], base.clone()]
    ref = mergekit("ramplus_tl", base, tensors, {"epsilon": 0.0})
    assert torch.isnan(ref).all()
    assert_bits(S.ramplus_tl(base, tensors, epsilon=0.0), ref)
    eps = METHODS["ramplus_tl"].param("epsilon")
    assert eps.low == 0.0 and eps.low_open


# ---------------------------------------------------------------- mixed dtypes
@pytest.mark.parametrize("name", NEW)
def test_mixed_dtypes_promote_like_mergekit(name):
    base, models = make_inputs((16, 12), torch.float32, n=2, scale=0.3)
    base = base.to(torch.bfloat16)  # bf16 base + float32 models -> float32 maths
    n = 1 if name in ("arcee_fusion", "nearswap") else 2
    b = None if name == "karcher" else base
    params = _required_values(name, n)
    mixed = [models[0].to(torch.bfloat16)] + models[1:n] if name == "karcher" else models[:n]
    ref = mergekit(name, b, mixed, params)
    ours = ADAPTERS[name](b, mixed, _resolve(name, params, n), None)
    assert ref.dtype == torch.float32
    assert_bits(ours, ref)


# ------------------------------------------------------------------ registry rows
_KINDS = {float: float, bool: bool, int: int}
_BASE = {BasePolicy.REQUIRED: "required", BasePolicy.OPTIONAL: "optional", BasePolicy.IGNORED: "unused"}


def _required_values(name, n):
    return {"multislerp": {"weight": [0.3, 0.9, 0.5][:n]}, "nearswap": {"t": 0.03}}.get(name, {})


def _resolve(name, given, n):
    """What the registry hands the adapter: defaults filled, per-model values as lists."""
    return resolve_params(name, given, n)


def test_registry_holds_mergekits_whole_method_list():
    assert set(METHODS) == {m.spec.name for m in mk_registry.registered_methods()}
    assert all(METHODS[name].fn is not None for name in METHODS)


@pytest.mark.parametrize("name", NEW)
def test_row_matches_mergekit_declaration(name):
    row, spec = METHODS[name], mk_registry.get(name).spec
    ours = {p.name: p for p in row.params}
    assert set(ours) == {p.name for p in spec.parameters}
    for p in spec.parameters:
        mine = ours[p.name]
        assert mine.required == p.required, p.name
        if not p.required:
            assert mine.default == p.default and type(mine.default) is type(p.default), p.name
        assert mine.per_model == (p.scope != ParameterScope.SHARED), p.name
        assert mine.kind is _KINDS[p.value_type], p.name
        assert mine.low <= mine.high and mine.doc
        if not p.required and mine.kind is not bool:  # the default lies inside the allowed range
            assert mine.check(p.default) == p.default, p.name
    contract = spec.contract
    assert row.base == _BASE[contract.base]
    has_base = 1 if contract.base == BasePolicy.REQUIRED else 0
    assert row.min_models == max(1, contract.min_inputs - has_base, contract.min_non_base or 0)
    assert row.max_models == (None if contract.max_inputs is None else contract.max_inputs - has_base)
    assert row.random == (name == "arcee_fusion")
    assert not any(math.isnan(p.low) or math.isnan(p.high) for p in row.params)


def test_searchable_rows_have_continuous_parameters():
    """A searchable method has a float parameter a space can evolve; the new ones marked so are those
    whose parameters blend models (weights, a distance, a selection fraction, a rescale strength)."""
    for name, spec in METHODS.items():
        if spec.searchable:
            assert any(p.kind is float for p in spec.params), name
    assert {n for n in NEW if METHODS[n].searchable} == {"multislerp", "nearswap", "sce", "ramplus_tl"}


def test_integer_parameter_accepts_integral_values_only():
    spec = METHODS["karcher"].param("max_iter")
    assert spec.check(3.0) == 3 and isinstance(spec.check(3.0), int)
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match="not an integer"):
        spec.check(2.5)
    with pytest.raises(ConfigError, match="out of range"):
        spec.check(-1)


NON_DEFAULT = {  # one value per parameter, each changed on its own
    "karcher": {"max_iter": 1, "tol": 0.5},
    "multislerp": {"normalize_weights": False, "eps": 0.1},
    "nearswap": {"t": 0.01},
    "sce": {"select_topk": 0.4, "int8_mask": True},
    "ram": {"epsilon": 0.02},
    "ramplus_tl": {"r": 2.0, "alpha": 3.0, "epsilon": 0.02},
}
NO_NUMERIC_EFFECT = {"int8_mask"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NEW)
def test_adapters_pass_every_parameter(name, dtype):
    """The adapter with defaults, and with each parameter changed alone, equals mergekit
    given the same (output in the inputs' dtype); each change does change the result."""
    row = METHODS[name]
    n = row.max_models or 3
    if name in ("ram", "ramplus_tl"):
        base, models = sparse_inputs((40, 24), dtype, n=n)
    elif name == "karcher":
        base, models = None, diverse_inputs((40, 24), dtype, n=n)
    else:
        base, models = make_inputs((40, 24), dtype, n=n, scale=0.3 if name == "multislerp" else 0.05)
    fn = row.fn
    required = _required_values(name, n)
    changes = [{}] + [{k: v} for k, v in NON_DEFAULT.get(name, {}).items()]
    assert {k for c in changes for k in c} | set(required) == {p.name for p in row.params}
    outs = []
    for change in changes:
        given = {**required, **change}
        ref = mergekit(name, base, models, given, out_dtype=dtype)
        out = fn(base, models, _resolve(name, given, n), _gen(0))
        assert_bits(out, ref)
        outs.append(out)
    for change, out in zip(changes[1:], outs[1:]):
        if not set(change) & NO_NUMERIC_EFFECT:
            assert not torch.equal(outs[0], out), f"{change} had no effect"
