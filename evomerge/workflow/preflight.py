"""Everything a run checks before it writes a file or reads a weight: `preflight(config, source, base_dir)`.

It reads only small files: every model's config.json (or GGUF header), every task's data file, the seed and
PS recipes. It checks the budget, that the models can be merged (architecture, hidden size, shapes, layer
counts where the merge needs them, vocabularies against the embedding policy), the method's parameters and
ranges (the very `ParameterSpace` the run builds, with the layer count from the configs), the stacking layout
(`DfsSpace` over the configs' layer counts, PS recipe layers, DUS drop), and every task: its file readable
UTF-8 text with the required columns and valid answers, and a non-empty search and held-out split (the split
logic of `evaluate.splits`). Every failure is one `EvomergeError` line naming the file and the key.

`evomerge validate` runs exactly this; `evomerge run` runs it before creating the run folder. What it learned
(genome size, per-task split sizes, layer counts) comes back as a `Preflight` whose `summary()` is printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.config import Evolved, SearchConfig, check_seconds, check_trials
from evomerge.errors import ConfigError, EvomergeError
from evomerge.recipe import Recipe
from evomerge.workflow.preflight_models import ModelInfo, check_compatible, read_model
from evomerge.workflow.preflight_tasks import TaskInfo, check_task
from evomerge.yamlio import read_text, validation_error

__all__ = ["ModelInfo", "Preflight", "TaskInfo", "load_recipe", "preflight"]


@dataclass(frozen=True)
class Preflight:
    """What a search space turned out to be, checked without loading weights."""

    source: str  # the search-space file
    models: dict[str, ModelInfo]  # name -> config facts (layer count, hidden size, ...)
    method: str  # the merge method, or "stacking (dfs)" / "stacking (dus)"
    dim: int  # genes in the genome
    genome: str  # how they are laid out, e.g. "weight, density x 3 models x 32 layer groups"
    tasks: list[TaskInfo]
    optimizer: str
    budget: str
    stack_layers: dict[str, int] = field(default_factory=dict)  # stacking source -> layer count (PS merge too)

    @property
    def layer_counts(self) -> dict[str, int]:
        return {name: m.num_layers for name, m in self.models.items()} | self.stack_layers

    def summary_lines(self) -> list[str]:
        types = sorted({m.model_type or "?" for m in self.models.values()})
        layers = sorted({m.num_layers for m in self.models.values()})
        n = len(self.models)
        models = (f"{_plural(n, 'model')} ({', '.join(types)}, {'/'.join(map(str, layers))} layers): "
                  + ", ".join(self.models))
        lines = [f"models:    {models}", f"method:    {self.method}",
                 f"genome:    {_plural(self.dim, 'gene')} ({self.genome})"]
        lines += [("tasks:     " if i == 0 else "           ") + t.describe() for i, t in enumerate(self.tasks)]
        lines += [f"optimizer: {self.optimizer}", f"budget:    {self.budget}"]
        return lines

    def summary(self) -> str:
        return "\n".join(self.summary_lines())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def preflight(config: SearchConfig, source: str, base_dir: Path) -> Preflight:
    """Check a parsed search space against its files; raise one EvomergeError naming file and key, or return
    what was learned. `source` is the space's file (named in errors), `base_dir` the folder its relative paths
    start from. Reads config.json / GGUF headers, task files and recipes; never a weight."""
    base_dir = Path(base_dir)
    _check_budget(config, source)
    _check_device(config, source)
    refs = config.resolved_models(base_dir)
    models = {name: read_model(name, ref, source=source) for name, ref in refs.items()}
    stack_layers: dict[str, int] = {}
    if config.stacking is None:
        method, dim, genome = _parameter_space(config, models, refs, source, base_dir)
    else:
        method, dim, genome, stack_layers = _stacking_space(config, models, source, base_dir)
    if dim < 1:
        raise ConfigError("nothing evolves: give at least one parameter a range ({range: [low, high]})",
                          file=source, key="parameters")
    _check_optimizer(config, source)
    tasks = [check_task(i, spec, source=source, base_dir=base_dir) for i, spec in enumerate(config.tasks)]
    b = config.budget
    budget = _plural(b.trials, "trial") + (f", at most {b.seconds:g} s" if b.seconds else ", no time limit")
    opt = config.optimizer
    optimizer = opt.name + (f", population {opt.popsize}" if opt.popsize else "") + \
        (f", {opt.restarts} restarts" if opt.restarts else "") + \
        (f", {len(config.tasks)} objectives" if config.objectives == "vector" else "")
    return Preflight(source, models, method, dim, genome, tasks, optimizer, budget, stack_layers)


# -- budget, device, optimizer ---------------------------------------------------------------------

def _check_budget(config: SearchConfig, source: str) -> None:
    """Again here: a command line override (`--trials`) is assigned after the schema was checked."""
    try:
        check_trials(config.budget.trials)
    except ValueError as exc:
        raise ConfigError(str(exc), file=source, key="budget.trials") from None
    try:
        check_seconds(config.budget.seconds)
    except ValueError as exc:
        raise ConfigError(str(exc), file=source, key="budget.seconds") from None


def _check_device(config: SearchConfig, source: str) -> None:
    import torch

    try:
        torch.device(config.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device '{config.device}'", file=source, key="device",
                          allowed="cpu, cuda, cuda:N, mps") from None


def _check_optimizer(config: SearchConfig, source: str) -> None:
    opt = config.optimizer
    objectives = len(config.tasks) if config.objectives == "vector" else 1
    if opt.name == "optuna-cmaes" and objectives > 1:
        raise ConfigError(f"optuna-cmaes optimizes one objective, not {objectives}", file=source,
                          key="optimizer.name", allowed="nsga2, tpe, random")
    if opt.restarts and opt.name == "optuna-cmaes":
        raise ConfigError("optuna-cmaes has no restarts (Optuna 4.4 dropped them)", file=source,
                          key="optimizer.restarts", allowed="0, or optimizer cmaes for IPOP restarts")


# -- the parameter space -----------------------------------------------------------------------------

def _parameter_space(config: SearchConfig, models: dict[str, ModelInfo], refs: dict[str, str], source: str,
                     base_dir: Path) -> tuple[str, int, str]:
    from evomerge.spaces.parameter import ParameterSpace

    check_compatible(models, same_layers=True, embeddings=config.embeddings, file=source)
    n_layers = models[config.base_model or next(iter(models))].num_layers
    space = ParameterSpace(config, refs, n_layers, source=source)
    for i, path in enumerate(config.seed_recipes):
        recipe, where = load_recipe(path, base_dir, key=f"seed_recipes.{i}", source=source)
        try:
            space.encode(recipe)
        except EvomergeError as exc:
            raise exc.located(where, "models") from None
    evolved = [f"{n} [{v.range[0]:g}, {v.range[1]:g}]" for n, v in space.parameters.items() if isinstance(v, Evolved)]
    owners = [m for m in space.members if space.evolving(m)]
    parts = [", ".join(evolved) or "no evolved parameter"]
    if any(n in space.spec.per_model_params for n, v in space.parameters.items() if isinstance(v, Evolved)):
        parts.append(_plural(len(owners), "model"))
    parts.append(space.points.describe() if space.genes else f"0 layer groups ({n_layers} layers)")
    if config.split_attn_mlp:
        parts.append("attention/MLP")
    how = f"{config.granularity}: {space.points_reason}" if config.granularity in ("auto", "curve") else \
        space.points_reason
    method = f"{space.method}" + (" (chat vector)" if config.chat_vector else "") + f", {how}"
    return method, space.dim, " x ".join(parts)


def load_recipe(path: str, base_dir: Path, *, key: str, source: str) -> tuple[Recipe, str]:
    """A recipe file named by the space (relative to its folder), parsed and its parameters checked."""
    from evomerge.merge.plan import validate_parameters
    from evomerge.merge.registry import METHODS

    p = Path(path).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if not p.is_file():
        raise ConfigError(f"recipe '{path}' not found ({p})", file=source, key=key)
    recipe = Recipe.from_yaml(read_text(p, what="recipe"), source=str(p)).expand_refs()
    if recipe.merge_method not in METHODS:
        raise ConfigError(f"unknown merge method '{recipe.merge_method}'", file=str(p), key="merge_method",
                          allowed=", ".join(sorted(METHODS)))
    validate_parameters(recipe, source=str(p))
    return recipe, str(p)


# -- the stacking space ------------------------------------------------------------------------------

def _stacking_space(config: SearchConfig, models: dict[str, ModelInfo], source: str, base_dir: Path
                    ) -> tuple[str, int, str, dict[str, int]]:
    """StackSpace's checks and genome size from configs alone (it opens the weights; this reads configs)."""
    from evomerge.merge.dfs import DfsSpace, check_stackable

    st = config.stacking
    assert st is not None
    if "merge_method" in config.model_fields_set and config.merge_method is not None:
        raise ConfigError(f"merge_method '{config.merge_method}' is not searched in a stacking search (it searches "
                          "layer paths); set merge_method: null and give the parameter-space merge as "
                          "stacking.ps_recipe", file=source, key="merge_method")
    if config.parameters:
        raise ConfigError("parameters are not searched in a stacking search; give the parameter-space merge as "
                          "stacking.ps_recipe", file=source, key="parameters")
    if config.seed_recipes:
        raise ConfigError("seed_recipes are not supported for stacking searches", file=source, key="seed_recipes")
    names = list(st.models or config.models)
    target = st.target or config.base_model or names[0]
    if st.mode == "dus":
        names = [target]
    if target not in names:
        names.insert(0, target)
    configs = [models[n].config for n in names]
    counts = [models[n].num_layers for n in names]
    if st.ps_recipe:
        ps_config, ps_layers = _ps_merge(st.ps_recipe, base_dir, source)
        names.insert(0, "ps_merge")
        configs.insert(0, ps_config)
        counts.insert(0, ps_layers)
        if not st.target:
            target = "ps_merge"
    try:
        check_stackable(configs, names)
    except EvomergeError as exc:
        raise ConfigError(exc.detail, file=source, key="stacking.models", allowed=exc.allowed) from None
    stack_layers = dict(zip(names, counts))
    layers = " + ".join(f"{n} {c}" for n, c in stack_layers.items())
    if st.mode == "dfs":
        keys = {"max_len": "stacking.max_length", "scale_bounds": "stacking.scale_range",
                "repeats": "stacking.repeats", "layer_counts": "stacking.models"}
        try:
            dfs = DfsSpace(counts, repeats=st.repeats, target=names.index(target), max_len=st.max_length,
                           scale_bounds=st.scale_range)
        except EvomergeError as exc:
            raise ConfigError(exc.detail, file=source, key=keys.get(exc.key or "", "stacking"),
                              allowed=exc.allowed) from None
        m = dfs.num_layers
        genome = (f"{dfs.num_slots} layer indicators ({m} layers: {layers}, x {st.repeats} repeats) "
                  f"+ {m * m} transition scales ({m} x {m})")
        return "stacking (dfs)", dfs.genome_size, genome, stack_layers
    n = counts[0]
    if st.drop is not None:
        if not 0 < st.drop < n:
            raise ConfigError(f"drop {st.drop} for a {n}-layer model", file=source, key="stacking.drop",
                              allowed=f"1..{n - 1}")
        return ("stacking (dus)", 1, f"fixed drop of {st.drop} layers: one candidate, {2 * (n - st.drop)} layers "
                f"from {layers}", stack_layers)
    return "stacking (dus)", 2, f"where the first copy ends and the second begins ({layers})", stack_layers


def _ps_merge(ps_recipe: str, base_dir: Path, source: str) -> tuple[Any, int]:
    """The config (the recipe's target's) and layer count of the PS merge a PS+DFS run materializes first."""
    from pydantic import ValidationError

    from evomerge.merge.plan import normalized_slices

    recipe, where = load_recipe(ps_recipe, base_dir, key="stacking.ps_recipe", source=source)
    models: dict[str, ModelInfo] = {}
    for ref in recipe.referenced_models():
        path = Path(ref).expanduser()  # as `evomerge merge` opens it: relative to the working folder
        models[ref] = read_model(ref, str(path.resolve()) if path.exists() else ref, source=where,
                                 key=_recipe_key(recipe, ref))
    check_compatible(models, same_layers=False, embeddings=recipe.options.embeddings, file=where,
                     embeddings_key="evomerge.embeddings")
    counts = {ref: m.num_layers for ref, m in models.items()}
    try:
        slices = normalized_slices(recipe, counts)
    except ValidationError as exc:  # e.g. `models:` of different layer counts: slices of unequal length
        raise validation_error(exc, where, key="models" if recipe.models else "slices") from None
    for si, sl in enumerate(slices):
        for sj, src in enumerate(sl.sources):
            if src.layer_range[1] > counts[src.model]:
                key = f"slices.{si}.sources.{sj}.layer_range" if recipe.slices else "models"
                raise ConfigError(f"layer_range {list(src.layer_range)} is out of bounds for '{src.model}'",
                                  file=where, key=key, allowed=f"0 <= start < end <= {counts[src.model]}")
    n = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in slices)
    if n < 1:
        raise ConfigError("the recipe's slices hold no layer", file=where, key="slices")
    return models[recipe.target_model()].config, n


def _recipe_key(recipe: Recipe, ref: str) -> str:
    if recipe.base_model == ref:
        return "base_model"
    for i, m in enumerate(recipe.models or []):
        if m.model == ref:
            return f"models.{i}.model"
    for i, sl in enumerate(recipe.slices or []):
        for j, src in enumerate(sl.sources):
            if src.model == ref:
                return f"slices.{i}.sources.{j}.model"
    return "evomerge.target_model"
