"""The one table of merge methods (``METHODS``: mergekit 0.1.5's whole list, with mergekit's names,
defaults and base policies, evomerge's allowed ranges and ``searchable`` flag) and ``merge_tensor``,
the single entry point that validates resolved parameters and calls the pure functions in
``methods``, ``methods_spherical`` and ``methods_selective``.

``params`` given to ``merge_tensor`` are already resolved for one tensor (the
recipe engine applies gradients, filters and slices first): global parameters as
scalars, per-model parameters as lists aligned with ``tensors`` (a scalar is
broadcast to every model, as mergekit does). Missing parameters take mergekit's
defaults; a missing required one, an unknown key, or a value out of range raises
``ConfigError`` naming the key and the allowed values (the caller adds the file).

mergekit declares types, not ranges: the bounds here are the values where a parameter means something.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Optional

import torch

from evomerge.errors import ConfigError
from evomerge.merge import methods
from evomerge.merge import methods_selective as selective
from evomerge.merge import methods_spherical as spherical
from evomerge.merge.specs import REQUIRED, MethodSpec, ParamSpec

__all__ = ["ParamSpec", "MethodSpec", "METHODS", "merge_tensor", "resolve_params", "REQUIRED"]

_INF = math.inf


# ------------------------------------------------------------------ parameter specs
def _weight(required: bool = True) -> ParamSpec:
    return ParamSpec("weight", default=REQUIRED if required else 1.0, per_model=True, search=(0.0, 1.0),
                     doc="multiplier of the model's task vector / share in the average")


_DENSITY = ParamSpec("density", default=1.0, low=0.0, high=1.0, low_open=True, per_model=True, search=(0.1, 1.0),
                     doc="fraction of the task vector kept")
_GAMMA = ParamSpec("gamma", default=0.01, low=0.0, high=1.0, per_model=True,
                   doc="fraction of largest-magnitude outliers removed (breadcrumbs)")
_EPSILON = ParamSpec("epsilon", default=0.15, low=0.0, high=0.5, high_open=True, per_model=True,
                     doc="DELLA keep-probability spread; density-epsilon > 0 and density+epsilon < 1")
_LAMBDA = ParamSpec("lambda", default=1.0, doc="scale of the merged task vector")
_INT8 = ParamSpec("int8_mask", bool, default=False, doc="mergekit memory option; no numeric effect")


def _bool(name: str, default: bool, doc: str = "") -> ParamSpec:
    return ParamSpec(name, bool, default=default, doc=doc)


def _gta_params(sparsification: Optional[str], normalize: bool, rescale: bool) -> tuple[ParamSpec, ...]:
    params = [
        _INT8,
        _bool("normalize", normalize, "divide by the sum of (agreeing) weights"),
        _bool("rescale", rescale, "L1-rescale each sparsified task vector"),
        _LAMBDA,
        _weight(),
        _DENSITY if sparsification else replace(_DENSITY, search=None),  # no sparsification: nothing to evolve
    ]
    if sparsification == "magnitude_outliers":
        params.append(_GAMMA)
    if sparsification == "della_magprune":
        params.append(_EPSILON)
    return tuple(params)


# the task-arithmetic family: method -> (sparsification, consensus) of mergekit's generalized_task_arithmetic
GTA_METHODS: dict[str, tuple[str | None, str | None]] = {
    "task_arithmetic": (None, None), "ties": ("magnitude", "sum"), "dare_ties": ("random", "sum"),
    "dare_linear": ("random", None), "breadcrumbs": ("magnitude_outliers", None),
    "breadcrumbs_ties": ("magnitude_outliers", "sum"), "della": ("della_magprune", "sum"),
    "della_linear": ("della_magprune", None),
}


def _gta(name: str, normalize: bool, rescale: bool, doc: str) -> MethodSpec:
    sparsification, consensus = GTA_METHODS[name]

    def run(base, tensors, p, generator):
        return methods.generalized_task_arithmetic(
            base, tensors, p["weight"], p["density"],
            sparsification=sparsification, consensus=consensus, normalize=p["normalize"],
            lambda_=p["lambda"], rescale=p["rescale"], gammas=p.get("gamma"),
            epsilons=p.get("epsilon"), int8_mask=p["int8_mask"], generator=generator,
        )

    return MethodSpec(name, "required", _gta_params(sparsification, normalize, rescale),
                      random=sparsification in ("random", "della_magprune"), doc=doc, fn=run)


def _linear(base, tensors, p, generator):
    return methods.linear(tensors, p["weight"], normalize=p["normalize"])


def _slerp(base, tensors, p, generator):
    return methods.slerp(p["t"], base, tensors[0])


def _nuslerp(base, tensors, p, generator):
    return methods.nuslerp(base, tensors, p["weight"], row_wise=p["nuslerp_row_wise"],
                           flatten=p["nuslerp_flatten"])


def _model_stock(base, tensors, p, generator):
    return methods.model_stock(base, tensors, filter_wise=p["filter_wise"])


def _passthrough(base, tensors, p, generator):
    return methods.passthrough(tensors[0], p["scale"][0])


def _in_dtype(result: torch.Tensor, base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The result in the inputs' promoted dtype (arcee_fusion and ramplus_tl compute float32 masks/scales)."""
    dtype = tensors[0].dtype
    for t in ([base] if base is not None else []) + list(tensors[1:]):
        dtype = torch.promote_types(dtype, t.dtype)
    return result.to(dtype=dtype)


def _arcee_fusion(base, tensors, p, generator):
    return _in_dtype(selective.arcee_fusion(base, tensors[0], generator=generator), base, tensors)


def _karcher(base, tensors, p, generator):
    return spherical.karcher(tensors, max_iter=p["max_iter"], tol=p["tol"])


def _multislerp(base, tensors, p, generator):
    try:
        return spherical.multislerp(base, tensors, p["weight"], normalize_weights=p["normalize_weights"],
                                    eps=p["eps"])
    except ValueError:  # mergekit raises too: 3+ models whose weighted unit (task) vectors cancel out
        raise ConfigError("multislerp: the weighted sum of the unit (task) vectors of a tensor is zero (antipodal "
                          "or unchanged tensors)", key="weight",
                          allowed="weights that do not balance out, or two models (they fall back to linear)") from None


def _nearswap(base, tensors, p, generator):
    return selective.nearswap(base, tensors[0], p["t"])


def _sce(base, tensors, p, generator):
    return selective.sce(base, tensors, select_topk=p["select_topk"], int8_mask=p["int8_mask"])


def _ram(base, tensors, p, generator):
    return selective.ram(base, tensors, epsilon=p["epsilon"])


def _ramplus_tl(base, tensors, p, generator):
    return _in_dtype(selective.ramplus_tl(base, tensors, r=p["r"], alpha=p["alpha"], epsilon=p["epsilon"]),
                     base, tensors)


# searchable=False: nothing continuous worth evolving (arcee_fusion has no parameters; karcher's are an
# iteration count and a tolerance; ram's epsilon only separates "changed" from rounding noise; model_stock
# has a boolean), or two fixed models (nuslerp); passthrough is layer stacking's, not a parameter space's.
METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("linear", "unused", (_weight(), _bool("normalize", True)), fn=_linear,
                   doc="weighted average of the models (float32 maths)"),
        _gta("task_arithmetic", False, False, "base + sum of weighted task vectors"),
        _gta("ties", True, False, "TIES: magnitude trim, sign election, disjoint mean"),
        _gta("dare_ties", False, True, "DARE drop and L1 rescale, TIES sign election"),
        _gta("dare_linear", False, True, "DARE drop and L1 rescale, plain sum"),
        _gta("breadcrumbs", False, False, "drop outliers and small values"),
        _gta("breadcrumbs_ties", False, False, "breadcrumbs + sign election"),
        _gta("della", True, True, "DELLA MagPrune + sign election"),
        _gta("della_linear", False, True, "DELLA MagPrune, plain sum"),
        MethodSpec("slerp", "required",
                   (ParamSpec("t", default=REQUIRED, low=0.0, high=1.0, search=(0.0, 1.0),
                              doc="interpolation from the base (0) to the other model (1)"),),
                   min_models=1, max_models=1, fn=_slerp,
                   doc="spherical interpolation between the base and one model"),
        MethodSpec("nuslerp", "optional",
                   (_weight(), _bool("nuslerp_row_wise", False), _bool("nuslerp_flatten", True)),
                   min_models=2, max_models=2, fn=_nuslerp, searchable=False,
                   doc="slerp of two models (or their task vectors when a base is given)"),
        MethodSpec("model_stock", "required", (_bool("filter_wise", False),), min_models=2,
                   fn=_model_stock, searchable=False, doc="Model Stock: geometric interpolation towards the average"),
        MethodSpec("passthrough", "unused",
                   (ParamSpec("scale", default=None, per_model=True, doc="optional multiplier"),),
                   min_models=1, max_models=1, fn=_passthrough, searchable=False,
                   doc="copy one model's tensor (layer stacking), optionally scaled"),
        MethodSpec("arcee_fusion", "required", (), min_models=1, max_models=1, random=True, searchable=False,
                   fn=_arcee_fusion,
                   doc="take the model's value where |model-base|*KL(softmax) is an upper outlier "
                   "(>= median + 1.5*IQR); random (sampled quantiles) only above 1M elements"),
        MethodSpec("karcher", "unused",
                   (ParamSpec("max_iter", int, default=10, low=0,
                              doc="most Riemannian gradient steps (0: normalized Euclidean mean of directions)"),
                    ParamSpec("tol", default=1e-5, low=0.0,
                              doc="stop when the tangent norm is below it; norms <= tol leave the direction mean")),
                   fn=_karcher, searchable=False,
                   doc="equal-weight Karcher mean of the models' directions on the unit sphere, scaled by "
                   "their mean norm (a base_model given is one more model, as in mergekit)"),
        MethodSpec("multislerp", "optional",
                   (_weight(), _bool("normalize_weights", True, "divide the weights by their sum"),
                    ParamSpec("eps", default=1e-8, low=0.0, doc="numerical floor for norms")),
                   fn=_multislerp,
                   doc="spherical barycentric interpolation of several models (of their task vectors when "
                   "a base is given)"),
        MethodSpec("nearswap", "required",
                   (ParamSpec("t", default=REQUIRED, low=0.0,
                              doc="distance within which the model's value is taken; farther ones move towards "
                              "the base (weight t/|base-model|)"),),
                   min_models=1, max_models=1, fn=_nearswap,
                   doc="take the model's value where it is near the base's, interpolate towards the base "
                   "elsewhere"),
        MethodSpec("sce", "required",
                   (_INT8, ParamSpec("select_topk", default=1.0, low=0.0, high=1.0,
                                     doc="fraction of elements (of those with nonzero variance across the task "
                                     "vectors) kept, largest variance first")),
                   fn=_sce,
                   doc="SCE: select high-variance elements, weight models by mean squared task vector, "
                   "erase sign conflicts"),
        MethodSpec("ram", "required",
                   (ParamSpec("epsilon", default=1e-5, low=0.0, doc="changes of at most epsilon count as unchanged"),),
                   fn=_ram, searchable=False,
                   doc="RAM: unique changes kept whole, changes shared by several models averaged"),
        MethodSpec("ramplus_tl", "required",
                   (ParamSpec("r", default=0.1, low=0.0, doc="strength of the unique-change rescale"),
                    ParamSpec("alpha", default=0.2, low=0.0, doc="cap on the shared/unique ratio in the rescale"),
                    ParamSpec("epsilon", default=1e-5, low=0.0, low_open=True,
                              doc="changes of at most epsilon count as unchanged; also the floor of the unique "
                              "count (0 makes a model without changes 0/0 = NaN everywhere, in mergekit too)")),
                   fn=_ramplus_tl,
                   doc="RAM+ (tensor-local): RAM with unique changes scaled by 1 + r*min(shared/unique, alpha)"),
    )
}


# ---------------------------------------------------------------------- resolution
def resolve_params(method: str, params: Mapping[str, Any], n_models: int) -> dict[str, Any]:
    """Fill defaults, broadcast per-model scalars and validate every value.

    Returns global parameters as Python scalars and per-model ones as lists of
    length ``n_models``.
    """
    spec = _spec(method)
    unknown = sorted(set(params) - {p.name for p in spec.params})
    if unknown:
        raise ConfigError(
            f"unknown parameter for merge method '{method}'",
            key=unknown[0],
            allowed=", ".join(p.name for p in spec.params) or "none",
        )
    out: dict[str, Any] = {}
    for p in spec.params:
        value = params.get(p.name, p.default)
        if value is REQUIRED:
            raise ConfigError(f"merge method '{method}' requires it", key=p.name, allowed=p.allowed)
        if not p.per_model:
            if isinstance(value, (list, tuple)):
                raise ConfigError("expected one value, got a list", key=p.name, allowed=p.allowed)
            out[p.name] = p.check(value)
            continue
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            if len(value) != n_models:
                raise ConfigError(
                    f"got {len(value)} values for {n_models} models", key=p.name,
                    allowed=f"one value per model ({n_models})",
                )
            values = list(value)
        else:
            values = [value] * n_models
        out[p.name] = [
            v if (v is None and p.default is None) else p.check(v, f"model {i}: ")
            for i, v in enumerate(values)
        ]
    if "epsilon" in out and "density" in out:  # DELLA (ram's epsilon is another parameter)
        for i, (d, e) in enumerate(zip(out["density"], out["epsilon"])):
            if d < 1 and not (d - e > 0 and d + e < 1):
                raise ConfigError(
                    f"model {i}: density {d:g} with epsilon {e:g} leaves (0, 1)",
                    key="epsilon",
                    allowed="density - epsilon > 0 and density + epsilon < 1 (when density < 1)",
                )
    return out


def _spec(method: str) -> MethodSpec:
    try:
        return METHODS[method]
    except KeyError:
        raise ConfigError(f"unknown merge method '{method}'", key="merge_method",
                          allowed=", ".join(METHODS)) from None


def merge_tensor(
    method: str,
    base: Optional[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    params: Mapping[str, Any],
    *,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Merge one tensor with ``method``; the one entry point for the recipe engine.

    ``tensors`` are the non-base models' tensors (all of the base's shape). Inputs of
    mixed dtypes are promoted to a common dtype, as mergekit does; the result has
    that dtype. ``generator`` seeds DARE/DELLA; same seed, same bits.
    """
    spec = _spec(method)
    tensors = list(tensors)
    n = len(tensors)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        allowed = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                   else f"at least {spec.min_models}" if spec.max_models is None
                   else f"{spec.min_models} to {spec.max_models}")
        raise ConfigError(f"merge method '{method}' got {n} models besides the base",
                          key="models", allowed=allowed)
    if spec.base == "required" and base is None:
        raise ConfigError(f"merge method '{method}' needs a base model", key="base_model",
                          allowed="a model path or id")
    shapes = {tuple(t.shape) for t in tensors}
    if spec.base != "unused" and base is not None:
        shapes.add(tuple(base.shape))
    if len(shapes) > 1:
        raise ConfigError(f"tensor shapes differ: {sorted(shapes)}", key="models",
                          allowed="models of the same architecture and sizes")
    resolved = resolve_params(method, params, n)
    if spec.base == "unused":
        base = None
    assert spec.fn is not None, f"merge method '{method}' has no implementation"  # every registered spec has one
    return spec.fn(base, tensors, resolved, generator)
