"""Genome <-> recipe: a vector in the unit box [0,1]^d maps to a mergekit recipe with per-layer lists.

Genes are laid out parameter by parameter, model by model, layer group by layer group, and (with
`split_attn_mlp`) attention before MLP. Gene g maps to low + g*(high-low), snapped to the parameter's
grid (densities default to steps of 0.001 so the fast TIES path can precompute thresholds). With the
attention/MLP split, tensors that are neither (layer norms, embeddings, lm_head) take the mean of the two.
`encode` is the inverse map, so a hand-written recipe can seed the search.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from evomerge.config import EVOLVE, Evolved, ParamValue, SearchConfig
from evomerge.errors import ConfigError
from evomerge.merge.registry import METHODS
from evomerge.merge.resident import ResidentMerger
from evomerge.merge.session import MergeSession
from evomerge.models.sources import WeightSource
from evomerge.recipe import Conditional, EvomergeOptions, ModelEntry, Recipe, TokenRows, evaluate_setting
from evomerge.spaces.genes import Gene, GeneLayout
from evomerge.spaces.points import MIN_POINTS, Points, auto_points, stated_search_items

DEFAULT_GRIDS = {"density": 0.001}
COMPONENT_FILTERS = {"attn": "self_attn", "mlp": "mlp"}


class ParameterSpace:
    """The parameter-space (PS) part of a search space, for models with `num_layers` layers."""

    def __init__(self, config: SearchConfig, model_refs: dict[str, str], num_layers: int, *, source: str = "<space>",
                 sources: dict[str, WeightSource] | None = None):
        self.config = config
        self.refs = model_refs
        self.sources = dict(sources or {})  # name -> open weight source (for the merger and the tokenizer)
        self.num_layers = num_layers
        self.source = source
        self.method = "task_arithmetic" if config.chat_vector else config.merge_method
        self.parameters: dict[str, ParamValue] = {}
        if self.method is None:
            self.genes: list[Gene] = []
            return
        self.spec = METHODS[self.method]
        self.parameters = self._with_defaults()
        self._check_parameters()
        self.members = self._members()
        self.points_reason: str = f"per {self.config.granularity}"  # why these points (auto says more)
        self.points = self._points()
        self.genes = self._layout_genes()

    # -- structure ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return len(self.genes)

    def _with_defaults(self) -> dict[str, ParamValue]:
        """The space's parameters, `evolve` and unnamed parameters that have a default range evolving over it
        (the method's main knobs: weight, density, slerp's t); what a space fixes stays fixed."""
        known = {**self.spec.per_model_params, **self.spec.global_params}
        params: dict[str, ParamValue] = {}
        for name, value in self.config.parameters.items():
            if value == EVOLVE:
                pspec = known.get(name)
                if pspec is not None and pspec.search is None:
                    raise ConfigError(f"{self.method}'s '{name}' has no default range", file=self.source,
                                      key=f"parameters.{name}", allowed="{range: [low, high]}")
                value = Evolved(range=pspec.search) if pspec is not None and pspec.search else value
            params[name] = value
        for name, pspec in known.items():
            if name not in params and pspec.search is not None:
                params[name] = Evolved(range=pspec.search)
        return params

    def _check_parameters(self) -> None:
        known = {**self.spec.per_model_params, **self.spec.global_params}
        for name, value in self.parameters.items():
            if name not in known:
                raise ConfigError(f"'{name}' is not a parameter of {self.method}", file=self.source,
                                  key=f"parameters.{name}", allowed=", ".join(sorted(known)))
            pspec = known[name]
            if isinstance(value, Evolved):
                if pspec.kind is bool:
                    raise ConfigError("a boolean parameter cannot evolve", file=self.source,
                                      key=f"parameters.{name}", allowed="true or false")
                for end in value.range:
                    try:
                        pspec.check(end)
                    except ConfigError:
                        raise ConfigError(f"range {list(value.range)} leaves what {self.method} allows",
                                          file=self.source, key=f"parameters.{name}.range",
                                          allowed=pspec.allowed) from None
            else:
                try:
                    pspec.check(value)
                except ConfigError as exc:
                    raise ConfigError(exc.detail, file=self.source, key=f"parameters.{name}",
                                      allowed=pspec.allowed) from None
        for name, pspec in self.spec.per_model_params.items():
            if pspec.required and name not in self.parameters and not self.config.chat_vector:
                raise ConfigError(f"{self.method} needs '{name}' (fixed or evolved)", file=self.source,
                                  key=f"parameters.{name}")

    def _members(self) -> list[str]:
        """Models merged (base excluded for methods with a base), in YAML order."""
        s = self.config
        if s.chat_vector:
            return [s.chat_vector.target, s.chat_vector.chat]
        base = s.base_model if self.spec.uses_base else None  # optional-base methods: task vectors from it
        if self.spec.needs_base and not base:
            raise ConfigError(f"{self.method} needs base_model", file=self.source, key="base_model")
        members = [m for m in s.models if m != base]
        lo, hi = self.spec.min_models, self.spec.max_models
        if len(members) < lo or (hi is not None and len(members) > hi):
            count = f"exactly {lo}" if lo == hi else f"{lo} or more" if hi is None else f"{lo} to {hi}"
            into = " into the base" if base else ""
            raise ConfigError(f"{self.method} merges {count} model(s){into}, got {len(members)}", file=self.source,
                              key="models", allowed=f"{count} model(s) besides base_model")
        return members

    def evolving(self, model: str) -> bool:
        s = self.config
        if s.chat_vector:
            return model == s.chat_vector.chat
        return model in (s.evolve_models or self.members)

    def _points(self) -> Points:
        n, s = self.num_layers, self.config
        if s.granularity == "model":
            return Points.grouped(n, max(n, 1))
        if s.granularity in ("layer", "block"):
            return Points.grouped(n, s.block_size if s.granularity == "block" else 1)
        per_point = self._genes_per_point()
        if s.granularity == "curve" and s.control_points:
            if not MIN_POINTS <= s.control_points <= n:
                raise ConfigError(f"a curve over {n} layers takes {MIN_POINTS} to {n} control points",
                                  file=self.source, key="control_points", allowed=f"{MIN_POINTS}..{n}")
            self.points_reason = f"curve of {s.control_points} points (control_points)"
            return Points.curved(n, s.control_points)
        points, self.points_reason = auto_points(n, per_point, stated_search_items(s))
        if s.granularity == "curve" and not points.curve:  # curve asked for: the largest that auto allows
            points, self.points_reason = Points.curved(n, n), f"curve of {n} points ({self.points_reason})"
        return points

    def _genes_per_point(self) -> int:
        owners = len([m for m in self.members if self.evolving(m)])
        evolved = [n for n, v in self.parameters.items() if isinstance(v, Evolved)]
        per = sum(owners if n in self.spec.per_model_params else 1 for n in evolved)
        return per * len(self._components())

    def _components(self) -> list[str]:
        return ["attn", "mlp"] if self.config.split_attn_mlp else ["all"]

    def _layout_genes(self) -> list[Gene]:
        genes = []
        for name, value in self.parameters.items():
            if not isinstance(value, Evolved):
                continue
            grid = value.grid or DEFAULT_GRIDS.get(name)
            owners: list[str | None]
            if name in self.spec.per_model_params:
                owners = [m for m in self.members if self.evolving(m)]
            else:
                owners = [None]
            for owner in owners:
                for gi in range(len(self.points)):
                    for comp in self._components():
                        genes.append(Gene(name, owner, gi, comp, value.range[0], value.range[1], grid))
        return genes

    # -- genome -> recipe --------------------------------------------------------------------------
    def per_point(self, genome: np.ndarray) -> dict[tuple[str, str | None, str], list[float]]:
        """(param, model, component) -> value at every point (layer group or control point)."""
        genome = np.asarray(genome, dtype=float)
        if genome.shape != (self.dim,):
            raise ValueError(f"genome has {genome.shape} genes, the space has {self.dim}")
        out: dict[tuple[str, str | None, str], list[float]] = {}
        for g, gene in zip(genome, self.genes):
            out.setdefault((gene.param, gene.model, gene.component), [math.nan] * len(self.points))[gene.group] = \
                gene.value(g)
        return out

    def per_layer(self, genome: np.ndarray) -> dict[tuple[str, str | None, str], list[float]]:
        """(param, model, component) -> value at every layer, as the recipe resolves it."""
        return {key: self.points.layer_values(row) for key, row in self.per_point(genome).items()}

    def layer_params(self, genome: np.ndarray) -> dict[str, list[float]]:
        """Row label -> per-layer values, for the report's heatmap."""
        return {f"{p}/{m or '*'}/{c}": v for (p, m, c), v in self.per_layer(genome).items()}

    def _setting(self, rows: dict[str, list[float]]) -> Any:
        """Per-point rows for one parameter -> a mergekit setting (scalar, gradient, or attn/mlp filters)."""
        compact = self.points.setting

        if "all" in rows:
            return compact(rows["all"])
        attn, mlp = rows["attn"], rows["mlp"]
        other = [round((a + b) / 2, 6) for a, b in zip(attn, mlp)]
        return [Conditional(filter=COMPONENT_FILTERS["attn"], value=compact(attn)),
                Conditional(filter=COMPONENT_FILTERS["mlp"], value=compact(mlp)),
                Conditional(value=compact(other))]

    def decode(self, genome: np.ndarray) -> Recipe:
        s = self.config
        table = self.per_point(genome)
        shared: dict[str, Any] = {}
        per_model: dict[str, dict[str, Any]] = {m: {} for m in self.members}
        for name, value in self.parameters.items():
            is_model_param = name in self.spec.per_model_params
            if isinstance(value, Evolved):
                fixed = value.init if value.init is not None else (value.range[0] + value.range[1]) / 2
                if is_model_param:
                    for m in self.members:
                        rows = {c: v for (p, mm, c), v in table.items() if p == name and mm == m}
                        per_model[m][name] = self._setting(rows) if rows else fixed
                else:
                    shared[name] = self._setting({c: v for (p, _, c), v in table.items() if p == name})
            elif is_model_param:
                for m in self.members:
                    per_model[m][name] = value
            else:
                shared[name] = value
        if s.chat_vector:  # target + λ·(chat − base) == base + 1·(target − base) + λ·(chat − base)
            per_model[s.chat_vector.target] = {"weight": 1.0}
            per_model[s.chat_vector.chat].setdefault("weight", 1.0)
        entries = [ModelEntry(model=self.refs[m], parameters=per_model[m] or None) for m in self.members]
        if self.method == "slerp":
            assert s.base_model is not None  # _members() refused slerp without base_model
            entries.insert(0, ModelEntry(model=self.refs[s.base_model]))
        target = s.chat_vector.target if s.chat_vector else (s.base_model or self.members[0])
        assert self.method is not None  # without a method there are no members (see __init__)
        return Recipe(
            merge_method=self.method,
            base_model=self.refs[s.base_model] if s.base_model and self.spec.uses_base else None,
            models=entries,
            parameters=shared or None,
            dtype=s.dtype,
            evomerge=EvomergeOptions(seed=s.seed, embeddings=s.embeddings,
                                     target_model=(self.refs[target]
                                                   if s.chat_vector or s.embeddings != "merge" else None),
                                     token_rows=self._token_rows()),
        )

    def _token_rows(self) -> TokenRows | None:
        cv = self.config.chat_vector
        if cv is None or cv.special_tokens is None:
            return None
        return TokenRows(model=self.refs[cv.chat], tokens=cv.special_tokens)  # type: ignore[arg-type]

    # -- recipe -> genome --------------------------------------------------------------------------
    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome closest to a hand-written recipe (values clipped to the ranges)."""
        by_ref = {ref: name for name, ref in self.refs.items()}
        model_params = {}
        for entry in recipe.models or []:
            model_params[by_ref.get(entry.model, entry.model)] = entry.parameters or {}
        genome = np.empty(self.dim)
        n = self.num_layers
        for i, gene in enumerate(self.genes):
            t = self.points.position(gene.group)
            layer = round(t * (n - 1))
            comp = {"attn": "self_attn.q_proj", "mlp": "mlp.up_proj", "all": "self_attn.q_proj"}[gene.component]
            tensor = f"model.layers.{layer}.{comp}.weight"
            value = None
            scopes = [model_params.get(gene.model, {})] if gene.model else []
            scopes.append(recipe.parameters or {})
            for scope in scopes:
                if gene.param in scope:
                    value = evaluate_setting(tensor, scope[gene.param], t)
                    if value is not None:
                        break
            if value is None:
                value = (gene.low + gene.high) / 2
            genome[i] = gene.gene(float(value))
        return genome

    def dedupe_key(self, genome: np.ndarray) -> str:
        """Candidates whose decoded values are equal (after grids and rounding) share a key."""
        return hashlib.sha256(self.decode(genome).to_yaml().encode()).hexdigest()[:32]

    def initial_genome(self) -> np.ndarray | None:
        return None  # the centre of every range

    def gene_layout(self) -> GeneLayout:
        """Readable gene names in real units for the study: `sort.weight.layer0`, `x.density.layers0-1.mlp`."""
        names = []
        for gene in self.genes:
            where = self.points.name(gene.group)
            part = "" if gene.component == "all" else f".{gene.component}"
            names.append(f"{gene.model or 'all'}.{gene.param}.{where}{part}")
        return GeneLayout(tuple(names), tuple(g.low for g in self.genes), tuple(g.high for g in self.genes))

    def baseline_genomes(self) -> list[tuple[str, np.ndarray]]:
        """The warm start's points: the sources that are points of this space (`source_genomes`), then the
        uniform hand-made merges of its method (one value for every layer and model). A setting is left out
        when it is no point of this space: a value outside an evolved range, or different from a value the
        space fixes."""
        from evomerge.spaces.baselines import uniform_baselines

        out: list[tuple[str, np.ndarray]] = list(self.source_genomes())
        keys: set[str] = {self.dedupe_key(g) for _, g in out}
        for label, recipes in uniform_baselines(self.config, self.refs).items():
            for recipe in recipes:
                values = _uniform_values(recipe)
                if recipe.merge_method != self.method or not self.dim or values is None:
                    continue
                if not self._holds(values):
                    continue
                genome = np.array([gene.gene(values[gene.param]) for gene in self.genes])
                key = self.dedupe_key(genome)
                if key not in keys:
                    keys.add(key)
                    out.append((f"{label}: " + ", ".join(f"{k} {v:g}" for k, v in values.items()), genome))
        return out

    def source_genomes(self) -> list[tuple[str, np.ndarray]]:
        """The parents themselves as points of the space, so a search starts no worse than the best of them:
        the base (every weight 0) and each member alone (its weight 1, the others' 0), with every other evolved
        parameter at its no-op value (density 1; members need a fixed density to be 1 too). None when the space
        cannot hold them (a weight range without 0 or 1, a member whose weight is fixed, another evolved
        parameter)."""
        evolved = {g.param for g in self.genes}
        if not self.dim or "weight" not in evolved or not evolved <= {"weight", "density"}:
            return []
        owners = {g.model for g in self.genes if g.param == "weight"}
        if self.config.chat_vector or owners != set(self.members):
            return []
        density = self.parameters.get("density")
        alone = not isinstance(density, (int, float)) or density == 1.0  # a fixed density < 1 trims the parent
        points = [(f"source: {m}", {m}) for m in self.members] if alone else []
        if self.spec.uses_base and self.config.base_model:
            points.insert(0, (f"source: {self.config.base_model}", set()))
        out = []
        for label, ones in points:
            values = [1.0 if g.param == "density" else float(g.model in ones) for g in self.genes]
            if any(not g.low <= v <= g.high for g, v in zip(self.genes, values)):
                return []
            out.append((label, np.array([g.gene(v) for g, v in zip(self.genes, values)])))
        return out

    def _holds(self, values: dict[str, float]) -> bool:
        for name, setting in self.parameters.items():
            if name not in values:
                continue
            if isinstance(setting, Evolved):
                gene = next(g for g in self.genes if g.param == name)
                if abs(gene.value(gene.gene(values[name])) - values[name]) > 1e-9:
                    return False
            elif isinstance(setting, (int, float)) and not isinstance(setting, bool) and setting != values[name]:
                return False
        return all(g.param in values for g in self.genes)

    @property
    def target(self) -> str:
        """The model whose tokenizer, config and (with a vocabulary policy) embeddings the merge keeps."""
        c = self.config
        if c.chat_vector:
            return c.chat_vector.target
        return c.base_model or next(iter(c.models))

    def tokenizer_source(self) -> WeightSource:
        return self.sources[self.target]

    def make_merger(self, *, device: str, offload: str) -> ResidentMerger:
        """Source weights read once and held resident; candidates merged in place into one live model."""
        template = self.decode(np.full(self.dim, 0.5))
        by_ref = {self.refs[n]: s for n, s in self.sources.items()}
        try:
            session = MergeSession.open(template, device="cpu", source=self.source, sources=by_ref)
        except ConfigError as exc:  # the recipe key the space wrote, said as the space's key
            if not (exc.key or "").startswith("evomerge.token_rows"):
                raise
            raise ConfigError(exc.detail, file=self.source, key="chat_vector.special_tokens") from None
        return ResidentMerger(template, device=device, offload=offload, source=self.source, session=session)



def _uniform_values(recipe: Recipe) -> dict[str, float] | None:
    """The per-model values of a recipe that gives every model the same scalar settings, else None."""
    values: dict[str, float] | None = None
    for entry in recipe.models or []:
        params = {k: float(v) for k, v in (entry.parameters or {}).items() if isinstance(v, (int, float))}
        if values is None:
            values = params
        elif params != values:
            return None
    return values
