"""What each merge method takes (mergekit names, defaults and allowed ranges) and
``merge_tensor``, the single entry point that validates resolved parameters and
calls the pure function in ``methods``.

``params`` given to ``merge_tensor`` are already resolved for one tensor (the
recipe engine applies gradients, filters and slices first): global parameters as
scalars, per-model parameters as lists aligned with ``tensors`` (a scalar is
broadcast to every model, as mergekit does). Missing parameters take mergekit's
defaults; a missing required one, an unknown key, or a value out of range raises
``ConfigError`` naming the key and the allowed values (the caller adds the file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from evomerge.errors import ConfigError
from evomerge.merge import methods

__all__ = ["ParamSpec", "MethodSpec", "METHODS", "merge_tensor", "resolve_params", "REQUIRED"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
_INF = math.inf


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its mergekit name, type, default and allowed interval."""

    name: str
    kind: type = float  # float or bool
    default: Any = REQUIRED
    low: float = -_INF
    high: float = _INF
    low_open: bool = False
    high_open: bool = False
    per_model: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def allowed(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.low == -_INF and self.high == _INF:
            return "any finite number"
        lo = "(" if self.low_open or self.low == -_INF else "["
        hi = ")" if self.high_open or self.high == _INF else "]"
        return f"{lo}{_fmt(self.low)}, {_fmt(self.high)}{hi}"

    def check(self, value: Any, where: str = "") -> Any:
        """Return the value as ``kind`` or raise ConfigError naming key and range."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ConfigError(f"{where}{value!r} is not a boolean", key=self.name, allowed=self.allowed)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            else:
                raise ConfigError(f"{where}{value!r} is not a number", key=self.name, allowed=self.allowed)
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}{value} is not finite", key=self.name, allowed=self.allowed)
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high:
            raise ConfigError(f"{where}{_fmt(value)} is out of range", key=self.name, allowed=self.allowed)
        return value


def _fmt(x: float) -> str:
    if x in (-_INF, _INF):
        return "-inf" if x < 0 else "inf"
    return f"{x:g}"


@dataclass(frozen=True)
class MethodSpec:
    """A merge method as mergekit defines it.

    ``base``: 'required' (task-vector methods, slerp, model_stock), 'optional'
    (nuslerp) or 'unused' (linear, passthrough: a base given is ignored).
    ``min_models``/``max_models`` count the non-base models. ``random``: the result
    depends on the generator (DARE, DELLA).
    """

    name: str
    base: str
    params: tuple[ParamSpec, ...]
    min_models: int = 1
    max_models: Optional[int] = None
    random: bool = False
    searchable: bool = True  # a search space may evolve its parameters (see evomerge/spaces/parameter.py)
    doc: str = ""
    fn: Optional[Callable[..., torch.Tensor]] = field(default=None, repr=False, compare=False)

    @property
    def per_model_params(self) -> dict[str, ParamSpec]:
        return {p.name: p for p in self.params if p.per_model}

    @property
    def global_params(self) -> dict[str, ParamSpec]:
        return {p.name: p for p in self.params if not p.per_model}

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


# ------------------------------------------------------------------ parameter specs
def _weight(required: bool = True) -> ParamSpec:
    return ParamSpec("weight", default=REQUIRED if required else 1.0, per_model=True,
                     doc="multiplier of the model's task vector / share in the average")


_DENSITY = ParamSpec("density", default=1.0, low=0.0, high=1.0, low_open=True, per_model=True,
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
        _DENSITY,
    ]
    if sparsification == "magnitude_outliers":
        params.append(_GAMMA)
    if sparsification == "della_magprune":
        params.append(_EPSILON)
    return tuple(params)


def _gta(name: str, sparsification: Optional[str], consensus: Optional[str], normalize: bool,
         rescale: bool, doc: str) -> MethodSpec:
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


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("linear", "unused", (_weight(), _bool("normalize", True)), fn=_linear,
                   doc="weighted average of the models (float32 maths)"),
        _gta("task_arithmetic", None, None, False, False, "base + sum of weighted task vectors"),
        _gta("ties", "magnitude", "sum", True, False, "TIES: magnitude trim, sign election, disjoint mean"),
        _gta("dare_ties", "random", "sum", False, True, "DARE drop and L1 rescale, TIES sign election"),
        _gta("dare_linear", "random", None, False, True, "DARE drop and L1 rescale, plain sum"),
        _gta("breadcrumbs", "magnitude_outliers", None, False, False, "drop outliers and small values"),
        _gta("breadcrumbs_ties", "magnitude_outliers", "sum", False, False, "breadcrumbs + sign election"),
        _gta("della", "della_magprune", "sum", True, True, "DELLA MagPrune + sign election"),
        _gta("della_linear", "della_magprune", None, False, True, "DELLA MagPrune, plain sum"),
        MethodSpec("slerp", "required",
                   (ParamSpec("t", default=REQUIRED, low=0.0, high=1.0,
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
    if "epsilon" in out:
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
