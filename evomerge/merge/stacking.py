"""Layer stacking (Sakana's data-flow-space merge, SOLAR's depth up-scaling) on the source models' own tensors.

A *path* is a list of (source index, layer index) pairs naming decoder layers of already-loaded
source models; *scales* has one positive float per position: the residual stream is multiplied by
it before it enters that position's layer. Embeddings, final norm, lm_head and config come from
the target model.

Folding the scales into weights (why the stacked model is an ordinary model)
------------------------------------------------------------------------------
Write x_k for the residual stream after position k (x_0 = the embedding output) and
c_k = s_1 * ... * s_k for the product of the scales up to and including position k. A pre-norm
layer (Llama, Mistral, Qwen2, Gemma 1, ...) is

    u = x + A(N1(x)),   L(x) = u + F(N2(u))

with RMSNorms N1, N2 and residual outputs A (ending in o_proj) and F (ending in down_proj). An
RMSNorm without eps is invariant to positive factors: N(c x) = N(x) for c > 0. Claim: the stacked
model's x_k equals c_k * y_k, where y_k is the residual stream of a plain model whose layer at
position k has o_proj and down_proj (weight and bias) divided by c_k. Induction: the stacked input
of position k is s_k x_{k-1} = c_k y_{k-1}, so

    u = c_k y_{k-1} + A(N1(y_{k-1}))  = c_k (y_{k-1} + A(N1(y_{k-1})) / c_k) = c_k u~
    x_k = c_k u~ + F(N2(u~))          = c_k (u~ + F(N2(u~)) / c_k)          = c_k y_k.

Attention keys and values are computed from N1(.) and so are the same in both models (the KV
cache agrees too). At the end, logits = lm_head(Nf(x_n)) = lm_head(Nf(c_n y_n)) = lm_head(Nf(y_n)):
the final norm absorbs the leftover factor c_n, and it, the embeddings and lm_head stay unchanged.

With eps, N(c y) = y / sqrt(ms(y) + eps / c^2): the folded model behaves like the stacked one with
eps / c^2 in place of eps at each norm. Relative differences are about eps * |1/c^2 - 1| / (2 ms(y)):
negligible in real models (ms(y) >> eps) but visible in tiny random ones whose activations are
near 0.02 (ms about 4e-4): with eps=1e-6 that is ~1e-3, with eps=1e-12 it is at rounding level.

Sandwich norms (Gemma 2/3): the residual outputs are post_attention_layernorm(A(...)) and
post_feedforward_layernorm(F(...)); dividing them by c_k means dividing those norms' gains by c_k.
Gemma's RMSNorm multiplies by (1 + w), so w becomes (1 + w) / c_k - 1 (Llama-style gains: w / c_k).
Scales must be positive: N(-x) = -N(x), so a negative factor would not fold.

The search scores what it ships
-------------------------------
Because of eps, the scaled stack (`build_stacked_model`, Sakana's definition) and the folded one differ by
~eps / ms(y), and only the folded one can be written as a model (mergekit's passthrough `scale`). So the
search's live model is the folded one, built from the very recipe it exports (`build_recipe_model`): each
position's layer shares the source layer's tensors, except the tensors the recipe scales, which are computed
by the same planner and merge function as `evomerge merge`. Live model == `evomerge merge` of the exported
recipe == mergekit's merge of it, bit for bit in the weights, at any eps.
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence, cast

import torch
from torch import nn

from evomerge.errors import ConfigError
from evomerge.merge.dfs import check_stackable, validate_path
from evomerge.merge.stacking_recipes import cumulative_scales, dus_path, dus_recipe, to_passthrough_recipe

if TYPE_CHECKING:
    from evomerge.models.layout import ModelLayout
    from evomerge.recipe import Recipe

Path = list[tuple[int, int]]

__all__ = [
    "StackInfo", "build_stacked_model", "build_recipe_model", "stacked_config", "fold_scales", "cumulative_scales",
    "to_passthrough_recipe", "dus_path", "dus_recipe",
]


@dataclass
class StackInfo:
    """What a stacked model was built from (kept on the model as `_evomerge_stack`)."""

    target: Any
    path: Path
    scales: list[float]
    sources: list[Any]


# ---- module plumbing ---------------------------------------------------------------------------
def _base(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "model")
    base = getattr(model, prefix, None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no '{prefix}.layers' decoder layer list", key="architecture",
                          allowed="decoder-only causal LMs with <prefix>.layers (Llama, Mistral, Qwen2, Gemma, ...)")
    return base


def _layers(model: nn.Module) -> nn.ModuleList:
    return cast(nn.ModuleList, _base(model).layers)  # _base checked it is a ModuleList


def _alias(module: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the same tensor objects as `module`'s.

    copy.copy alone would share the `_modules` / `_parameters` / hook dicts, so setting
    `self_attn.layer_idx` or replacing a weight on the copy would change the original too.
    """
    new = _copy.copy(module)
    for key, value in list(vars(new).items()):
        if key != "_modules" and isinstance(value, (dict, set)):
            vars(new)[key] = _copy.copy(value)
    vars(new)["_modules"] = {k: (None if c is None else _alias(c)) for k, c in module._modules.items()}
    return new


def _set_layer_idx(layer: nn.Module, idx: int) -> None:
    """Give every submodule that indexes the KV cache (self_attn.layer_idx, ...) the position idx."""
    for m in layer.modules():
        if isinstance(vars(m).get("layer_idx"), int):
            m.layer_idx = idx  # type: ignore[assignment]  # torch types Module.__setattr__ as Tensor | Module only


class _ScaleInput:
    """Forward pre-hook: multiply the decoder layer's hidden_states input by a constant."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, module, args, kwargs):
        if args:
            return (args[0] * self.scale,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] * self.scale
        return args, kwargs


def stacked_config(target_config, path: Sequence[tuple[int, int]], source_configs: Sequence[Any]):
    """The target's config for a stack along `path`: num_hidden_layers and per-position layer_types.

    Also the workaround for mergekit 0.1.5 with transformers 5.x on models whose config has
    `layer_types` (Qwen2, Qwen3, Gemma 2/3): mergekit writes the tensors but fails to save a config
    whose layer count changed; save this config into its output folder instead.
    """
    cfg = _copy.deepcopy(target_config)
    cfg.num_hidden_layers = len(path)
    if getattr(cfg, "layer_types", None) is not None:
        types = []
        for src, layer in path:
            src_types = getattr(source_configs[src], "layer_types", None)
            types.append(src_types[layer] if src_types is not None else "full_attention")
        cfg.layer_types = types
    return cfg


def _check_inputs(target, path, scales, sources) -> tuple[Path, list[float]]:
    if not sources:
        raise ConfigError("no source models given", key="sources", allowed="one or more loaded models")
    path = [(int(s), int(layer)) for s, layer in path]
    scales = [float(s) for s in scales]
    validate_path(path, scales, [len(_layers(m)) for m in sources])
    check_stackable([target.config] + [m.config for m in sources],
                    names=["target"] + [f"source {i}" for i in range(len(sources))])
    return path, scales


def _assemble(target: nn.Module, path: Path, sources: Sequence[nn.Module], layers: list[nn.Module],
              clone: bool = False) -> nn.Module:
    """A model of the target's class whose decoder layers are `layers` and the rest is the target's."""
    cfg = stacked_config(target.config, path, [m.config for m in sources])
    with torch.device("meta"):
        new = type(target)(cfg)
    base, new_base = _base(target), _base(new)
    prefix = getattr(target, "base_model_prefix", "model")
    outer = {n: c for n, c in target.named_children() if n != prefix}
    inner = {n: c for n, c in base.named_children() if n != "layers"}
    if clone:  # one deepcopy keeps tied embeddings / lm_head tied
        outer, inner = _copy.deepcopy((outer, inner))
    for name, child in outer.items():
        setattr(new, name, child)
    for name, child in inner.items():
        setattr(new_base, name, child)
    for key in ("_parameters", "_buffers"):
        for name, t in getattr(base, key).items():
            getattr(new_base, key)[name] = t
    new_base.layers = nn.ModuleList(layers)
    left = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if left:
        raise ConfigError(f"could not share tensors {left[:3]} of {type(target).__name__}", key="architecture",
                          allowed="models whose non-layer modules are direct children")
    if getattr(target, "generation_config", None) is not None:
        new.generation_config = _copy.deepcopy(target.generation_config)
    new.train(target.training)
    return new


def build_stacked_model(target_model: nn.Module, path: Sequence[tuple[int, int]], scales: Sequence[float],
                        sources: Sequence[nn.Module]) -> nn.Module:
    """A causal LM whose decoder layers are the path's layers of `sources`, sharing their tensors.

    Each position gets its own module objects (own `self_attn.layer_idx` = position, so a layer used
    twice writes two KV-cache entries) whose parameters are the source layer's tensors; a forward
    pre-hook multiplies the hidden state by the position's scale (no hook where the scale is 1).
    This is Sakana's scaled stack, the reference the folding is derived from; it cannot be written as
    a model, so the search scores `build_recipe_model` of the exported recipe instead.
    """
    path, scales = _check_inputs(target_model, path, scales, sources)
    layers = []
    for k, ((src, li), s) in enumerate(zip(path, scales)):
        layer = _alias(_layers(sources[src])[li])
        _set_layer_idx(layer, k)
        if s != 1.0:
            layer.register_forward_pre_hook(_ScaleInput(s), with_kwargs=True)
        layers.append(layer)
    model = _assemble(target_model, path, sources, layers)
    model._evomerge_stack = StackInfo(target_model, path, scales, list(sources))  # type: ignore[assignment]  # torch's __setattr__ type
    return model


def _is_one_plus_norm(norm: nn.Module) -> bool:
    """True for Gemma-style RMSNorm (x_normed * (1 + w)), probed numerically rather than by class name."""
    w = cast(torch.Tensor, norm.weight).detach()
    with torch.no_grad():  # ones are already normalized: the output is the gain, w or 1 + w
        out = norm(torch.ones(1, w.shape[-1], device=w.device, dtype=w.dtype)).float().reshape(-1)
    plain = (out - w.float()).abs().max()
    gemma = (out - (1.0 + w.float())).abs().max()
    return bool(gemma < plain)


def _residual_outputs(layer: nn.Module) -> tuple[str, list[tuple[nn.Module, bool]]]:
    """('norm' | 'linear', [(module, is_one_plus)]) whose output is added to the residual stream."""
    if not hasattr(layer, "input_layernorm"):
        raise ConfigError(f"{type(layer).__name__} has no input_layernorm: scales do not fold into a post-norm "
                          "layer", key="architecture", allowed="pre-norm (Llama, Mistral, Qwen2, ...) or Gemma 2/3")
    if hasattr(layer, "post_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm"):
        norms = [cast(nn.Module, layer.post_attention_layernorm), cast(nn.Module, layer.post_feedforward_layernorm)]
        return "norm", [(n, _is_one_plus_norm(n)) for n in norms]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    o_proj, down = getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)
    if not isinstance(o_proj, nn.Linear) or not isinstance(down, nn.Linear):
        raise ConfigError(f"{type(layer).__name__} has no self_attn.o_proj / mlp.down_proj linear layers",
                          key="architecture", allowed="Llama-like layers (o_proj, down_proj)")
    return "linear", [(o_proj, False), (down, False)]


def _scaled_param(p: torch.Tensor, fn) -> nn.Parameter:
    return nn.Parameter(fn(p.detach().float()).to(p.dtype), requires_grad=False)


def fold_scales(model: nn.Module, path: Sequence[tuple[int, int]] | None = None,
                scales: Sequence[float] | None = None, sources: Sequence[nn.Module] | None = None,
                *, clone: bool = False) -> nn.Module:
    """A plain model (no hooks) equal to the scaled stack: the scales folded into weights.

    Call with a model from `build_stacked_model`, or with (target, path, scales, sources). Only the
    residual-output tensors of positions whose cumulative scale is not 1 are new; every other tensor
    is shared with the sources unless `clone` (then every tensor is a copy, e.g. for save_pretrained,
    which refuses tensors shared between layers).
    """
    if path is None:
        info = getattr(model, "_evomerge_stack", None)
        if info is None:
            raise ConfigError("fold_scales needs a stacked model or path, scales and sources", key="path",
                              allowed="a model from build_stacked_model, or path + scales + sources")
        target, path, scales, sources = info.target, info.path, info.scales, info.sources
    else:
        if scales is None or sources is None:
            raise ConfigError("path given without scales or sources", key="scales",
                              allowed="path, scales and sources together")
        target = model
    path, scales = _check_inputs(target, path, scales, sources)
    layers = []
    for k, ((src, li), c) in enumerate(zip(path, cumulative_scales(scales))):
        layer = _alias(_layers(sources[src])[li])
        _set_layer_idx(layer, k)
        if clone:
            for m in layer.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None:
                        m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                for name, b in list(m._buffers.items()):
                    if b is not None:
                        m._buffers[name] = b.clone()
        if c != 1.0:
            kind, mods = _residual_outputs(layer)
            for mod, one_plus in mods:
                if kind == "norm":
                    fn = (lambda w, c=c: (1.0 + w) / c - 1.0) if one_plus else (lambda w, c=c: w / c)
                    mod._parameters["weight"] = _scaled_param(cast(torch.Tensor, mod.weight), fn)
                else:
                    mod._parameters["weight"] = _scaled_param(cast(torch.Tensor, mod.weight), lambda w, c=c: w / c)
                    bias = cast("torch.Tensor | None", mod.bias)
                    if bias is not None:
                        mod._parameters["bias"] = _scaled_param(bias, lambda b, c=c: b / c)
        layers.append(layer)
    return _assemble(target, path, sources, layers, clone=clone)


def build_recipe_model(recipe: "Recipe", models: Mapping[str, nn.Module], layouts: Mapping[str, "ModelLayout"],
                       *, source: str = "<recipe>") -> nn.Module:
    """The live model of a passthrough (layer-stacking) recipe: the model `evomerge merge` writes for it.

    `models` maps every model reference of the recipe to a loaded causal LM (in the recipe's dtype), `layouts`
    to its file layout (`ModelLayout.from_source`), as `evomerge merge` plans with. Each output layer is its
    own module tree (own `layer_idx`, so a layer used twice keeps two KV-cache entries) sharing the source
    layer's tensors, except those the recipe gives a `scale` other than 1: they are new tensors computed by
    `compute_tensor`, the function `evomerge merge` writes (x * 1.0 == x, so a scale of 1 keeps the shared
    tensor). Embeddings, final norm and lm_head are the target model's, which the recipe must take unscaled
    (to_passthrough_recipe's empty target slices do).
    """
    from evomerge.merge.execute import compute_tensor
    from evomerge.merge.plan import build_plan

    if recipe.merge_method != "passthrough":
        raise ConfigError(f"a live stack needs a passthrough recipe, not {recipe.merge_method}", file=source,
                          key="merge_method", allowed="passthrough")
    plan = build_plan(recipe, layouts, source=source)
    target = models[plan.target]
    path: Path = []
    refs = list(models)
    for tp in plan.tensors:
        ref, name = tp.inputs[0].model, tp.inputs[0].name
        if tp.layer is None:
            if (ref, name) != (plan.target, tp.out_name) or plan.resolve(tp).get("scale", [None])[0] not in (None, 1.0):
                raise ConfigError(f"{tp.out_name} does not come unscaled from the target model '{plan.target}'",
                                  file=source, key="slices", allowed="first and last slices of the target model")
        elif tp.layer == len(path):
            path.append((refs.index(ref), cast(int, layouts[ref].layer_of(name))))
    sources = [models[r] for r in refs]
    path, _ = _check_inputs(target, path, [1.0] * len(path), sources)
    layers = []
    for k, (src, li) in enumerate(path):
        layer = _alias(_layers(sources[src])[li])
        _set_layer_idx(layer, k)
        layers.append(layer)

    def fetch(model: str, name: str) -> torch.Tensor:
        return models[model].get_parameter(name).detach()

    with torch.no_grad():
        for tp in plan.tensors:
            scale = plan.resolve(tp).get("scale", [None])[0] if tp.layer is not None else None
            if scale is None or scale == 1.0:
                continue
            rel = tp.out_name.removeprefix(f"{layouts[plan.target].layer_prefix}{tp.layer}.")  # self_attn.o_proj.weight
            module_name, _, leaf = rel.rpartition(".")
            module = layers[cast(int, tp.layer)].get_submodule(module_name)
            module._parameters[leaf] = nn.Parameter(compute_tensor(plan, tp, fetch), requires_grad=False)
    return _assemble(target, path, sources, layers)
