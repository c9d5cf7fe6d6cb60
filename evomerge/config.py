"""The search-space YAML: what to merge, what evolves, how it is scored, the optimizer and the budget.

Validated with pydantic; every error names the file, the dotted key and what is allowed.
Model references may be paths relative to the YAML file, Hugging Face ids, or GGUF files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.dtypes import DTYPES
from evomerge.envvars import expand
from evomerge.evaluate.spec import TaskSpec
from evomerge.merge.registry import METHODS
from evomerge.yamlio import KeyedValueError, load_mapping, read_text, validate

SEARCH_METHODS = tuple(name for name, spec in METHODS.items() if spec.searchable)
OPTIMIZERS = ("cmaes", "optuna-cmaes", "tpe", "nsga2", "random")


class Evolved(BaseModel):
    """A parameter the search evolves within [low, high]; `grid` snaps values (densities default to 0.001)."""

    model_config = ConfigDict(extra="forbid")
    range: tuple[float, float]
    grid: float | None = Field(default=None, gt=0)
    init: float | None = None  # starting value (default: centre of the range)

    @model_validator(mode="after")
    def _ordered(self) -> "Evolved":
        lo, hi = self.range
        if not lo < hi:
            raise ValueError(f"range must be [low, high] with low < high, got {list(self.range)}")
        if self.init is not None and not lo <= self.init <= hi:
            raise ValueError(f"init {self.init} is outside range {list(self.range)}")
        return self


EVOLVE = "evolve"  # evolve over the method's default range for the parameter
ParamValue = Union[Evolved, float, bool, Literal["evolve"]]


class ChatVector(BaseModel):
    """θ_target + λ·(θ_chat − θ_base): the delta's base is not the model it is added to."""

    model_config = ConfigDict(extra="forbid")
    target: str
    chat: str
    # rows of embed_tokens / lm_head put into the target from the chat model after the merge (the Chat Vector
    # paper's special-token map): a list of tokens (the same string in both), or {target token: chat token};
    # integers are row ids
    special_tokens: list[Union[int, str]] | dict[Union[int, str], Union[int, str]] | None = None


class StackingConfig(BaseModel):
    """Layer stacking (data-flow space); see evomerge/merge/dfs.py."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["dfs", "dus"] = "dfs"
    models: list[str] = Field(default_factory=list)  # source models whose layers may run (default: all)
    target: str | None = None  # model giving embeddings, final norm, lm_head, tokenizer
    repeats: int = Field(default=2, ge=1)
    max_length: int | None = Field(default=None, ge=2)
    scale_range: tuple[float, float] = (0.5, 1.5)
    drop: int | None = Field(default=None, ge=1)  # DUS: fixed number of layers dropped (None: searched)
    ps_recipe: str | None = None  # PS+DFS: the recipe (path) of the parameter-space merge, stacking source 0

    @field_validator("scale_range")
    @classmethod
    def _scales(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"scale_range must be [low, high] with 0 < low <= high, got {list(v)}")
        return v


class OptimizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "cmaes"
    popsize: int | None = Field(default=None, ge=2)
    sigma0: float = Field(default=1 / 6, gt=0, le=1)
    restarts: int = Field(default=0, ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{v}' (allowed: {', '.join(OPTIMIZERS)})")
        return v


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trials: int = 100
    seconds: float | None = None  # wall-clock limit of the search; null: none

    @field_validator("trials")
    @classmethod
    def _positive(cls, v: int) -> int:
        return check_trials(v)

    @field_validator("seconds")
    @classmethod
    def _positive_seconds(cls, v: float | None) -> float | None:
        return check_seconds(v)


def check_trials(v: int) -> int:
    if v < 1:
        raise ValueError(f"the trial budget must be at least 1, got {v}")
    return v


def check_seconds(v: float | None) -> float | None:
    if v is not None and not (math.isfinite(v) and v > 0):
        raise ValueError(f"the time budget must be a number of seconds > 0, or null for none; got {v}")
    return v


class HeldOut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(default=3, ge=1)
    sources: bool = True  # also score every source model on the held-out split
    baselines: bool = True  # uniform merges chosen on the search split


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    models: dict[str, str]  # short name -> path / hub id / gguf
    base_model: str | None = None
    merge_method: str | None = "ties"
    chat_vector: ChatVector | None = None
    evolve_models: list[str] | None = None  # models whose per-model parameters evolve (default: all but base)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    # auto: per layer while there are about 10 search items per gene, else a curve of control points
    granularity: Literal["auto", "layer", "block", "model", "curve"] = "auto"
    block_size: int = Field(default=1, ge=1)
    control_points: int | None = Field(default=None, ge=2)  # curve: K points (default: as auto allows)
    split_attn_mlp: bool = False
    embeddings: Literal["merge", "keep_target", "align"] = "merge"
    stacking: StackingConfig | None = None
    tasks: list[TaskSpec]
    objectives: Literal["weighted", "vector"] = "weighted"
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    budget: Budget = Field(default_factory=Budget)
    heldout: HeldOut = Field(default_factory=HeldOut)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    offload: Literal["auto", "never", "always"] = "auto"
    threads: int | None = Field(default=None, ge=1)  # torch CPU threads; null: physical cores / evomerge workers here
    run_dir: str | None = None  # default: runs/<name>
    seed_recipes: list[str] = Field(default_factory=list)  # hand-written recipes to start the search from
    # score the uniform hand-made merges of the same genome space first and start the search at the best
    warm_start: bool = True

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unknown dtype '{v}' (allowed: {', '.join(DTYPES)})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SearchConfig":
        names = set(self.models)
        for key, ref in (("base_model", self.base_model),):
            if ref is not None and ref not in names:
                raise KeyedValueError(f"'{ref}' is not one of models: {sorted(names)}", key)
        if self.merge_method is not None and self.merge_method not in SEARCH_METHODS:
            raise KeyedValueError(f"unknown merge_method '{self.merge_method}' (allowed: {', '.join(SEARCH_METHODS)})",
                                  "merge_method")
        if self.merge_method is None and self.stacking is None:
            raise KeyedValueError("give a merge_method (parameter space), a stacking section (data-flow space), "
                                  "or both", "merge_method")
        for m in self.evolve_models or []:
            if m not in names:
                raise KeyedValueError(f"'{m}' is not one of models: {sorted(names)}", "evolve_models")
        if self.chat_vector:
            for role in ("target", "chat"):
                if getattr(self.chat_vector, role) not in names:
                    raise KeyedValueError(f"'{getattr(self.chat_vector, role)}' is not one of models: "
                                          f"{sorted(names)}", f"chat_vector.{role}")
            if not self.base_model:
                raise KeyedValueError("chat_vector needs base_model (the model the chat delta is taken from)",
                                      "base_model")
        if self.control_points is not None and self.granularity != "curve":
            raise KeyedValueError("control_points needs granularity: curve", "control_points")
        if self.objectives == "vector" and self.optimizer.name == "cmaes":
            raise KeyedValueError("several objectives need a multi-objective optimizer "
                                  "(optimizer.name: nsga2, tpe or random)", "optimizer.name")
        if not self.tasks:
            raise KeyedValueError("at least one task is needed", "tasks")
        task_names = [t.name for t in self.tasks]
        dup = next((n for n in task_names if task_names.count(n) > 1), None)
        if dup is not None:
            raise KeyedValueError(f"two tasks are named '{dup}'; task names must be unique", "tasks")
        if self.stacking is not None:
            named = [("models", m) for m in self.stacking.models]
            if self.stacking.target is not None:
                named.append(("target", self.stacking.target))
            for where, m in named:
                if m not in names:
                    raise KeyedValueError(f"'{m}' is not one of models: {sorted(names)}", f"stacking.{where}")
        return self

    def resolved_models(self, base_dir: Path) -> dict[str, str]:
        """Model refs with paths made relative to the YAML file's folder (hub ids stay as they are)."""
        out = {}
        for name, ref in self.models.items():
            p = Path(ref).expanduser()
            if not p.is_absolute() and (base_dir / p).exists():
                p = base_dir / p
            out[name] = str(p.resolve()) if p.exists() else ref
        return out


# keys that spaces written for older versions may still set: why they are gone
REMOVED_KEYS = {"use_ps_result": "removed: give the parameter-space merge as stacking.ps_recipe, "
                                 "which becomes stacking source 0"}


def load_search_space(path: str | Path) -> tuple[SearchConfig, str]:
    """Parse and validate a search-space file; returns the space and its text (snapshotted into the run)."""
    text = read_text(path, what="search-space file")
    return parse_search_space(text, source=str(path)), text


def parse_search_space(text: str, *, source: str) -> SearchConfig:
    data = load_mapping(text, source=source, what="a search space")
    return _expand_paths(validate(SearchConfig, data, source=source, hints=REMOVED_KEYS))


def _expand_paths(space: SearchConfig) -> SearchConfig:
    """`${VAR}` and `~` in model references, task files and recipe paths (the demo points at its zoo so)."""
    space.models = {k: expand(v) for k, v in space.models.items()}
    space.tasks = [t.model_copy(update={"path": expand(t.path)}) if t.path else t for t in space.tasks]
    space.seed_recipes = [expand(p) for p in space.seed_recipes]
    if space.stacking is not None and space.stacking.ps_recipe:
        space.stacking.ps_recipe = expand(space.stacking.ps_recipe)
    return space
