"""Plan a recipe: which input tensors make each output tensor, with which resolved parameters.

Follows mergekit's planner: a `models:` recipe is one slice over all layers (the base added as a source
when missing); embeddings take the first slice's sources, the final norm and lm_head the last slice's,
both at gradient position t=0; inside a slice of n layers, layer i sits at t=i/(n-1) (t=1 when n=1).
Parameter precedence, highest first: the slice source's own parameters, the slice's, the top level's.
Per-model parameters see the *input* tensor name (source layer index), shared ones the output name.

The plan is pure data, built once; the resident merger re-resolves only parameters per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from evomerge.errors import ConfigError
from evomerge.merge.registry import METHODS
from evomerge.models.layout import ModelLayout, ParamKind
from evomerge.recipe import Conditional, OutputSlice, Recipe, SliceSource, evaluate_setting

VOCAB_KINDS = (ParamKind.EMBED, ParamKind.LM_HEAD)
POST_KINDS = (ParamKind.FINAL_NORM, ParamKind.LM_HEAD)


@dataclass(frozen=True)
class TensorInput:
    model: str
    name: str


@dataclass
class TensorPlan:
    """How one output tensor is made."""

    out_name: str
    kind: ParamKind
    inputs: list[TensorInput]
    base_index: int | None  # position of the base model among inputs, when the method uses one
    t: float
    slice_index: int  # which output slice's parameters apply (-1: none)
    layer: int | None  # output layer index
    vocab: str = "merge"  # merge | keep_target | align (embed/lm_head only)


@dataclass
class MergePlan:
    recipe: Recipe
    method: str
    tensors: list[TensorPlan]
    num_layers: int
    target: str
    slices: list[OutputSlice] = field(default_factory=list)

    def resolve(self, tp: TensorPlan) -> dict[str, Any]:
        """Parameters for one tensor: shared ones as scalars, per-model ones as lists over the non-base inputs."""
        sl = self.slices[tp.slice_index] if tp.slice_index >= 0 else None
        return resolve_parameters(self.recipe, self.method, tp, sl)


def normalized_slices(recipe: Recipe, layer_counts: Mapping[str, int]) -> list[OutputSlice]:
    """The recipe as output slices (mergekit turns `models:` into one slice spanning every layer)."""
    if recipe.slices:
        return list(recipe.slices)
    sources = []
    base_seen = False
    for entry in recipe.models or []:
        base_seen |= entry.model == recipe.base_model
        n = layer_counts.get(entry.model, 1)
        sources.append(SliceSource(model=entry.model, layer_range=(0, n), parameters=entry.parameters))
    if recipe.base_model and not base_seen:
        n = layer_counts.get(recipe.base_model, 1)
        sources.append(SliceSource(model=recipe.base_model, layer_range=(0, n)))
    return [OutputSlice(sources=sources)]


def build_plan(recipe: Recipe, layouts: Mapping[str, ModelLayout], *, source: str = "<recipe>") -> MergePlan:
    """Turn a recipe into a per-tensor plan; raises ConfigError for impossible layer ranges or methods."""
    method = recipe.merge_method
    if method not in METHODS:
        raise ConfigError(f"unknown merge method '{method}'", file=source, key="merge_method",
                          allowed=", ".join(sorted(METHODS)))
    spec = METHODS[method]
    if spec.needs_base and not recipe.base_model and not any(s.base_model for s in recipe.slices or []):
        raise ConfigError(f"merge method '{method}' needs a base model", file=source, key="base_model")
    validate_parameters(recipe, source=source)
    missing = [r for r in recipe.referenced_models() if r not in layouts]
    if missing:
        raise ConfigError(f"model '{missing[0]}' was not loaded", file=source, key="models")
    slices = normalized_slices(recipe, {r: lay.num_layers for r, lay in layouts.items()})
    target = recipe.target_model()
    target_layout = layouts[target]
    policy = recipe.options.embeddings

    for si, sl in enumerate(slices):
        for sj, src in enumerate(sl.sources):
            n = layouts[src.model].num_layers
            if src.layer_range[1] > n:
                key = f"slices.{si}.sources.{sj}.layer_range" if recipe.slices else "models"
                raise ConfigError(
                    f"layer_range {list(src.layer_range)} is out of bounds for '{src.model}'",
                    file=source, key=key, allowed=f"0 <= start < end <= {n}",
                )
        n_models = len(sl.sources) - (1 if spec.uses_base and (sl.base_model or recipe.base_model) else 0)
        if spec.max_models is not None and n_models > spec.max_models:
            raise ConfigError(f"'{method}' takes at most {spec.max_models} model(s) per slice, got {n_models}",
                              file=source, key=f"slices.{si}.sources" if recipe.slices else "models")

    def base_index(sl: OutputSlice) -> int | None:
        base = sl.base_model or recipe.base_model
        if not spec.uses_base or base is None:  # 'unused': a base given is merged as one more model (mergekit)
            return None
        models = [s.model for s in sl.sources]
        if base not in models:
            raise ConfigError(f"base model '{base}' is not among the slice's sources", file=source, key="base_model")
        return models.index(base)

    plans: list[TensorPlan] = []
    # embeddings and other pre-layer tensors: first slice, t=0
    first, last = slices[0], slices[-1]
    for name in target_layout.non_layer_names():
        kind = target_layout.kind_of(name)
        sl_index, sl = (len(slices) - 1, last) if kind in POST_KINDS else (0, first)
        vocab = policy if kind in VOCAB_KINDS else "merge"
        inputs = [TensorInput(s.model, name) for s in sl.sources]
        plans.append(TensorPlan(name, kind, inputs, base_index(sl), 0.0, sl_index, None, vocab))
    out_layer = 0
    for si, sl in enumerate(slices):
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        bi = base_index(sl)
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            for name in target_layout.names_in_layer(0):
                out_name = target_layout.rename_layer(name, out_layer)
                inputs = []
                for src in sl.sources:
                    in_name = layouts[src.model].rename_layer(name, src.layer_range[0] + offset)
                    inputs.append(TensorInput(src.model, in_name))
                plans.append(TensorPlan(out_name, target_layout.kind_of(name), inputs, bi, t, si, out_layer))
            out_layer += 1
    return MergePlan(recipe, method, plans, out_layer, target, slices)


def _sources_for(recipe: Recipe, sl: OutputSlice | None, model: str | None):
    """Parameter dictionaries from highest to lowest precedence (mergekit's ConfigReader.parameter_sources)."""
    if sl is not None:
        if model is not None:
            for src in sl.sources:
                if src.model == model:
                    yield src.parameters
        yield sl.parameters
    yield recipe.parameters


def _resolve_one(name: str, settings, tensor_name: str, t: float):
    for scope in settings:
        if scope is not None and name in scope:
            value = evaluate_setting(tensor_name, scope[name], t)
            if value is not None:
                return value
    return None


def resolve_parameters(recipe: Recipe, method: str, tp: TensorPlan, sl: OutputSlice | None) -> dict[str, Any]:
    """Shared parameters as scalars and per-model parameters as lists aligned with the non-base inputs.

    Values a recipe leaves out are absent here; `merge_tensor` fills mergekit's defaults and checks ranges.
    """
    spec = METHODS[method]
    out: dict[str, Any] = {}
    shared = list(_sources_for(recipe, sl, None))
    for pname in spec.global_params:
        v = _resolve_one(pname, shared, tp.out_name, tp.t)
        if v is not None:
            out[pname] = v
    for pname in spec.per_model_params:
        values = []
        for i, inp in enumerate(tp.inputs):
            if i == tp.base_index:
                continue
            value = _resolve_one(pname, list(_sources_for(recipe, sl, inp.model)), inp.name, tp.t)
            if value is None:
                pspec = spec.per_model_params[pname]
                if pspec.required:
                    raise ConfigError(f"missing required parameter for model '{inp.model}' ({inp.name})", key=pname)
                value = pspec.default
            values.append(value)
        if values:
            out[pname] = values
    return out


def _leaf_values(setting: Any) -> list[Any]:
    """Every scalar a setting can produce (gradient elements, conditional values)."""
    if isinstance(setting, Conditional):
        return _leaf_values(setting.value)
    if isinstance(setting, list):
        return [v for e in setting for v in _leaf_values(e)]
    return [setting]


def validate_parameters(recipe: Recipe, *, source: str = "<recipe>") -> None:
    """Check every parameter the recipe names, wherever it sits, against the method's names and ranges."""
    spec = METHODS[recipe.merge_method]
    known = {**spec.global_params, **spec.per_model_params}
    scopes: list[tuple[str, dict | None]] = [("parameters", recipe.parameters)]
    for i, m in enumerate(recipe.models or []):
        scopes.append((f"models.{i}.parameters", m.parameters))
    for i, sl in enumerate(recipe.slices or []):
        scopes.append((f"slices.{i}.parameters", sl.parameters))
        for j, src in enumerate(sl.sources):
            scopes.append((f"slices.{i}.sources.{j}.parameters", src.parameters))
    for where, params in scopes:
        for name, setting in (params or {}).items():
            if name not in known:
                raise ConfigError(f"'{name}' is not a parameter of {recipe.merge_method}", file=source,
                                  key=f"{where}.{name}", allowed=", ".join(sorted(known)) or "none")
            for value in _leaf_values(setting):
                try:
                    known[name].check(value)
                except ConfigError as exc:
                    raise ConfigError(exc.detail, file=source, key=f"{where}.{name}",
                                      allowed=known[name].allowed) from None


def output_config(plan: MergePlan, sources: dict, out_dtype: str):
    """The target's config with the merged layer count (and per-layer lists like layer_types) updated."""
    import copy

    cfg = copy.deepcopy(sources[plan.target].config)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list):
        new_types: list[str] = []
        for sl in plan.slices:
            src = sl.sources[0]
            src_types = getattr(sources[src.model].config, "layer_types", None) or layer_types
            new_types.extend(src_types[src.layer_range[0]:src.layer_range[1]])
        cfg.layer_types = new_types
    cfg.num_hidden_layers = plan.num_layers
    cfg.dtype = out_dtype
    return cfg
