"""Per-tensor equivalence with mergekit 0.1.5, called through its own merge-method
objects (``mergekit.merge_methods.registry.get(name)``) and sparsify functions."""

from __future__ import annotations

import pytest
import torch
from mergekit import sparsify as mk_sparsify
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import TensorGroup

from evomerge.errors import ConfigError
from evomerge.merge import methods as M
from evomerge.merge.registry import METHODS, merge_tensor

SHAPES = [(96,), (24, 40), (3, 8, 10)]
DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------------- helpers
def make_inputs(shape, dtype, n=3, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def mergekit(name, base, models, params):
    tensors = ([base] if base is not None else []) + list(models)
    group = TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None)
    return mk_registry.get(name)([group], parameters=params)[0]


def assert_equivalent(ours: torch.Tensor, ref: torch.Tensor):
    """float32: max abs diff <= 1e-6; bfloat16: within one bf16 spacing at that magnitude."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    a, b = ours.double(), ref.double()
    diff = (a - b).abs()
    if ref.dtype == torch.bfloat16:
        mag = torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(torch.bfloat16).tiny)
        ulp = torch.exp2(torch.floor(torch.log2(mag))) * torch.finfo(torch.bfloat16).eps
        assert bool((diff <= ulp).all()), f"max diff {diff.max().item()} exceeds 1 bf16 ulp"
    else:
        assert diff.max().item() <= 1e-6


WEIGHTS = [0.6, 0.9, -0.35]
DENSITIES = [0.3, 0.55, 0.9]


# --------------------------------------------------------- deterministic methods
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear(shape, dtype):
    _, models = make_inputs(shape, dtype)
    for normalize in (True, False):
        ref = mergekit("linear", None, models, {"weight": WEIGHTS, "normalize": normalize})
        assert_equivalent(M.linear(models, WEIGHTS, normalize=normalize), ref)
        assert_equivalent(merge_tensor("linear", None, models, {"weight": WEIGHTS, "normalize": normalize}), ref)


GTA_CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
    ("ties", {"density": DENSITIES}),
    ("ties", {"density": DENSITIES, "normalize": False, "lambda": 1.3, "rescale": True}),
    ("breadcrumbs", {"density": DENSITIES, "gamma": [0.05, 0.01, 0.0]}),
    ("breadcrumbs", {"density": [0.5, 0.9, 0.95], "gamma": [0.1, 0.2, 0.08], "rescale": True}),
    ("breadcrumbs_ties", {"density": DENSITIES, "gamma": 0.02}),
    ("breadcrumbs_ties", {"density": DENSITIES, "normalize": True}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,params", GTA_CASES)
def test_task_arithmetic_family(name, params, shape, dtype):
    base, models = make_inputs(shape, dtype)
    params = {"weight": WEIGHTS, **params}
    ref = mergekit(name, base, models, params)
    assert_equivalent(merge_tensor(name, base, models, params), ref)


def test_ties_sign_election_and_disjoint_mean_by_hand():
    """Small case worked by hand: zero sum elects +, divisor counts agreeing weights."""
    base = torch.zeros(4)
    models = [torch.tensor([1.0, -2.0, 1.0, 0.0]), torch.tensor([-1.0, 1.0, 3.0, 0.0])]
    out = merge_tensor("ties", base, models, {"weight": [1.0, 1.0], "density": [1.0, 1.0]})
    # col0: sum 0 -> '+' wins: 1/1; col1: sum -1 -> '-': -2/1; col2: 4/2; col3: no agreement -> 0
    assert torch.equal(out, torch.tensor([1.0, -2.0, 2.0, 0.0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(shape, dtype, filter_wise):
    base, models = make_inputs(shape, dtype)
    ref = mergekit("model_stock", base, models, {"filter_wise": filter_wise})
    assert_equivalent(M.model_stock(base, models, filter_wise=filter_wise), ref)
    assert_equivalent(merge_tensor("model_stock", base, models, {"filter_wise": filter_wise}), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp(shape, dtype, t):
    base, models = make_inputs(shape, dtype, n=1, scale=0.8)
    ref = mergekit("slerp", base, models, {"t": t})
    assert_equivalent(M.slerp(t, base, models[0]), ref)
    assert_equivalent(merge_tensor("slerp", base, models, {"t": t}), ref)


def test_slerp_nearly_collinear_is_lerp():
    base = torch.linspace(-1, 1, 200)
    other = base * 1.5 + 1e-4
    ref = mergekit("slerp", base, [other], {"t": 0.4})
    out = M.slerp(0.4, base, other)
    assert_equivalent(out, ref)
    torch.testing.assert_close(out, 0.6 * base + 0.4 * other, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp(dtype, with_base):
    base, models = make_inputs((24, 40), dtype, n=2, scale=0.5)
    b = base if with_base else None
    params = {"weight": [0.3, 0.7]}
    group = TensorGroup.from_tensors(([base] if with_base else []) + models, base_index=0 if with_base else None)
    ref = mk_registry.get("nuslerp")([group], parameters=params)[0]
    assert_equivalent(merge_tensor("nuslerp", b, models, params), ref)


def test_passthrough_scale():
    _, models = make_inputs((8, 4), torch.float32, n=1)
    ref = mergekit("passthrough", None, models, {"scale": [0.7]})
    assert torch.equal(merge_tensor("passthrough", None, models, {"scale": [0.7]}), ref)
    assert merge_tensor("passthrough", None, models, {}) is models[0]


def test_mixed_dtypes_promote_like_mergekit():
    base, models = make_inputs((24, 40), torch.bfloat16)
    models[1] = models[1].float()
    params = {"weight": WEIGHTS, "density": DENSITIES}
    ref = mergekit("ties", base, models, params)
    out = merge_tensor("ties", base, models, params)
    assert out.dtype == ref.dtype == torch.float32
    assert_equivalent(out, ref)


# ---------------------------------------------------------- sparsify functions
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparsify_deterministic_matches_mergekit(shape, dtype):
    delta = make_inputs(shape, dtype)[1][0] - make_inputs(shape, dtype)[0]
    for density in (0.01, 0.2, 0.5, 0.99, 1.0):
        for norm in (None, "l1"):
            mk_norm = mk_sparsify.RescaleNorm.l1 if norm else None
            ref = mk_sparsify.sparsify(delta, density, mk_sparsify.SparsificationMethod.magnitude, rescale_norm=mk_norm)
            assert torch.equal(M.sparsify(delta, density, "magnitude", rescale_norm=norm), ref)
            ref = mk_sparsify.sparsify(delta, density, mk_sparsify.SparsificationMethod.magnitude_outliers,
                                       gamma=0.05, rescale_norm=mk_norm)
            assert torch.equal(M.sparsify(delta, density, "magnitude_outliers", gamma=0.05, rescale_norm=norm), ref)


def test_breadcrumbs_small_gamma_removes_no_outliers():
    """gamma*numel < 1: nothing is removed at the top (older mergekit zeroed the
    whole delta here via an empty [n_bot:-0] slice; 0.1.5 and evomerge do not)."""
    delta = torch.randn(64, generator=torch.Generator().manual_seed(1))
    out = M.magnitude_outliers(delta, 0.5, gamma=0.01)  # int(0.64) == 0 outliers
    assert torch.equal(out, M.magnitude(delta, 0.5))
    assert int((out != 0).sum()) == 32
    assert out.abs().max() == delta.abs().max()  # the largest element survives
    ref = mk_sparsify.magnitude_outliers(delta, 0.5, gamma=0.01)
    assert torch.equal(out, ref)
    # and with enough elements the top gamma share is removed
    big = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    out = M.magnitude_outliers(big, 0.5, gamma=0.01)
    kept = out != 0
    assert int(kept.sum()) == 500
    top10 = big.abs().argsort(descending=True)[:10]
    assert not kept[top10].any()


# ------------------------------------------------------------- random methods
def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("method,eps", [("random", None), ("della_magprune", 0.1)])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.8])
def test_random_sparsify_density_and_l1_rescale(method, eps, density):
    delta = torch.randn(512, 512, generator=_gen(0))
    out = M.sparsify(delta, density, method, rescale_norm="l1", epsilon=eps, generator=_gen(1))
    kept = (out != 0).double().mean().item()
    assert abs(kept - density) <= 0.01 * density
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    # rescale is one scalar: the kept entries are delta * |delta|_1 / |masked|_1
    mask = out != 0
    factor = delta.abs().sum() / delta[mask].abs().sum()
    torch.testing.assert_close(out[mask], delta[mask] * factor, rtol=1e-6, atol=0)


def test_della_keeps_large_magnitudes_more_often():
    delta = torch.randn(256, 1024, generator=_gen(0))
    out = M.della_magprune(delta, 0.5, 0.3, generator=_gen(1))
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    kept = out != 0
    low = kept[ranks < 256].double().mean().item()
    high = kept[ranks >= 768].double().mean().item()
    assert 0.22 < low < 0.31 and 0.69 < high < 0.78  # p ramps 0.2 -> 0.8 across ranks


RANDOM_CASES = [
    ("dare_ties", {"density": DENSITIES}),
    ("dare_linear", {"density": DENSITIES, "lambda": 0.8}),
    ("della", {"density": [0.3, 0.5, 0.7], "epsilon": [0.1, 0.15, 0.2]}),
    ("della_linear", {"density": [0.3, 0.5, 0.7]}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,params", RANDOM_CASES)
def test_random_methods_same_seed_same_bits(name, params, dtype):
    base, models = make_inputs((64, 48), dtype)
    params = {"weight": WEIGHTS, **params}
    a = merge_tensor(name, base, models, params, generator=_gen(123))
    b = merge_tensor(name, base, models, params, generator=_gen(123))
    c = merge_tensor(name, base, models, params, generator=_gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a generator seeded s draws what mergekit draws after torch.manual_seed(s)
    with torch.random.fork_rng():
        torch.manual_seed(123)
        ref = mergekit(name, base, models, params)
    assert torch.equal(a, ref)


def test_density_one_equals_deterministic_counterparts():
    base, models = make_inputs((32, 32), torch.float32)
    ones = [1.0, 1.0, 1.0]
    g = _gen(5)
    ta_consensus = M.generalized_task_arithmetic(
        base, models, WEIGHTS, sparsification=None, consensus="sum", normalize=False)

    def merged(name, **params):
        return merge_tensor(name, base, models, {"weight": WEIGHTS, **params}, generator=g)

    assert torch.equal(merged("dare_ties", density=ones), ta_consensus)
    assert torch.equal(merged("ties", density=ones, normalize=False), ta_consensus)
    assert torch.equal(merged("dare_linear", density=ones), merged("task_arithmetic"))
    assert torch.equal(merged("della", density=ones), merged("ties", density=ones))
    assert torch.equal(merged("della_linear", density=ones), merged("task_arithmetic"))


# ------------------------------------------------------------ registry / errors
@pytest.mark.parametrize(
    "method,params,key,allowed",
    [
        ("ties", {"weight": WEIGHTS, "density": [0.5, 0.0, 0.5]}, "density", "(0, 1]"),
        ("ties", {"weight": WEIGHTS, "density": 1.5}, "density", "(0, 1]"),
        ("slerp", {"t": 1.2}, "t", "[0, 1]"),
        ("slerp", {}, "t", "[0, 1]"),
        ("ties", {"density": 0.5}, "weight", "any finite number"),
        ("ties", {"weight": [1.0, float("nan"), 1.0]}, "weight", "any finite number"),
        ("ties", {"weight": [1.0, 1.0]}, "weight", "one value per model"),
        ("ties", {"weight": WEIGHTS, "normalize": "yes"}, "normalize", "true or false"),
        ("ties", {"weight": WEIGHTS, "densty": 0.5}, "densty", "density"),
        ("breadcrumbs", {"weight": WEIGHTS, "gamma": -0.1}, "gamma", "[0, 1]"),
        ("della", {"weight": WEIGHTS, "density": 0.9, "epsilon": 0.15}, "epsilon", "density + epsilon < 1"),
        ("della", {"weight": WEIGHTS, "density": 0.3, "epsilon": 0.6}, "epsilon", "[0, 0.5)"),
        ("nosuch", {}, "merge_method", "ties"),
    ],
)
def test_merge_tensor_range_errors(method, params, key, allowed):
    base, models = make_inputs((8,), torch.float32, n=1 if method == "slerp" else 3)
    with pytest.raises(ConfigError) as err:
        merge_tensor(method, base, models, params)
    assert err.value.key == key
    assert allowed in str(err.value)


def test_merge_tensor_structure_errors():
    base, models = make_inputs((8,), torch.float32)
    with pytest.raises(ConfigError, match="needs a base"):
        merge_tensor("ties", None, models, {"weight": WEIGHTS})
    with pytest.raises(ConfigError, match="exactly 1"):
        merge_tensor("slerp", base, models, {"t": 0.5})
    with pytest.raises(ConfigError, match="at least 2"):
        merge_tensor("model_stock", base, models[:1], {})
    with pytest.raises(ConfigError, match="shapes differ"):
        merge_tensor("ties", base, [models[0], torch.zeros(9)], {"weight": [1.0, 1.0]})


def test_defaults_are_mergekits():
    for name, spec in METHODS.items():
        if name in ("passthrough",):
            continue
        mk = mk_registry.get(name).spec
        ours = {p.name: p for p in spec.params}
        for p in mk.parameters:
            assert p.name in ours, (name, p.name)
            if p.required:
                assert ours[p.name].required, (name, p.name)
            else:
                assert ours[p.name].default == p.default, (name, p.name)
        assert set(ours) == {p.name for p in mk.parameters}, name


def test_every_method_runs_through_merge_tensor():
    base, models = make_inputs((16, 8), torch.float32)
    for name, spec in METHODS.items():
        n = spec.max_models or 3
        params = {"weight": [0.5] * n} if "weight" in spec.per_model_params else {}
        if name in ("slerp", "nearswap"):
            params = {"t": 0.5}
        if name.startswith("della"):
            params["density"] = 0.5
        out = merge_tensor(name, base if spec.base != "unused" else None, models[:n], params, generator=_gen(0))
        assert out.shape == base.shape and torch.isfinite(out).all(), name


def test_linear_zero_weight_sum_is_finite_unlike_mergekit():
    _, models = make_inputs((8,), torch.float32, n=2)
    ref = mergekit("linear", None, models, {"weight": [1.0, -1.0]})
    assert not torch.isfinite(ref).all()  # the documented mergekit behaviour we fix
    out = M.linear(models, [1.0, -1.0])
    torch.testing.assert_close(out, models[0] - models[1])
    assert any("linear" in d for d in M.DIFFERENCES_FROM_MERGEKIT)
