"""The shape of a merge method's declaration: ``ParamSpec`` (one parameter: mergekit's name, kind,
default, evomerge's allowed interval) and ``MethodSpec`` (base policy, model counts, parameters,
whether a search may evolve it, the adapter to its pure tensor function).

The one table of methods built from these is ``registry.METHODS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from evomerge.errors import ConfigError

__all__ = ["REQUIRED", "ParamSpec", "MethodSpec"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
_INF = math.inf


def _fmt(x: float) -> str:
    if x in (-_INF, _INF):
        return "-inf" if x < 0 else "inf"
    return f"{x:g}"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its mergekit name, type (float, int or bool), default and allowed interval."""

    name: str
    kind: type = float
    default: Any = REQUIRED
    low: float = -_INF
    high: float = _INF
    low_open: bool = False
    high_open: bool = False
    per_model: bool = False
    doc: str = ""
    search: tuple[float, float] | None = None  # the range a search evolves it in when a space does not say

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def allowed(self) -> str:
        if self.kind is bool:
            return "true or false"
        what = "an integer in " if self.kind is int else ""
        if self.low == -_INF and self.high == _INF:
            return "any integer" if self.kind is int else "any finite number"
        lo = "(" if self.low_open or self.low == -_INF else "["
        hi = ")" if self.high_open or self.high == _INF else "]"
        return f"{what}{lo}{_fmt(self.low)}, {_fmt(self.high)}{hi}"

    def check(self, value: Any, where: str = "") -> Any:
        """Return the value as ``kind`` or raise ConfigError naming key and range.

        Integers accept integral floats (a gradient of integers interpolates to floats), as mergekit's
        pydantic validation does (10.0 -> 10); 2.5 is refused.
        """
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
        if self.kind is int and not value.is_integer():
            raise ConfigError(f"{where}{_fmt(value)} is not an integer", key=self.name, allowed=self.allowed)
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high:
            raise ConfigError(f"{where}{_fmt(value)} is out of range", key=self.name, allowed=self.allowed)
        return int(value) if self.kind is int else value


@dataclass(frozen=True)
class MethodSpec:
    """A merge method as mergekit defines it.

    ``base``: 'required' (task-vector methods, slerp, model_stock, ...), 'optional' (nuslerp,
    multislerp: task vectors when a base is given) or 'unused' (linear, passthrough, karcher: a base
    given is merged as one more model, as mergekit does). ``min_models``/``max_models`` count the
    non-base models. ``random``: the result depends on the generator (DARE, DELLA, arcee_fusion on
    large tensors). ``searchable``: a search space may name the method and evolve its continuous
    parameters (evomerge/spaces/parameter.py lays out their genes).
    """

    name: str
    base: str
    params: tuple[ParamSpec, ...]
    min_models: int = 1
    max_models: Optional[int] = None
    random: bool = False
    searchable: bool = True
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

    @property
    def uses_base(self) -> bool:
        """The base, when given, is the origin of task vectors rather than one more model."""
        return self.base != "unused"

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)
