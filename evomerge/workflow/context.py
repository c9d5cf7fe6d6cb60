"""What a run holds once it is set up: the search config, the genome space, the open weight sources, the
resident merger and the evaluators (data tokenized once per split), and the objective the search calls."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluate.evaluator import Evaluator
from evomerge.evaluate.tasks import context_length
from evomerge.models.sources import WeightSource
from evomerge.search.driver import CandidateFailed, Outcome
from evomerge.spaces.base import GenomeSpace, Merger


@dataclass
class RunContext:
    """Everything a run needs, built once (weights resident, data tokenized)."""

    config: SearchConfig
    text: str  # the search space's YAML as given (snapshotted into the run)
    source: str  # the file it came from (errors name it)
    base_dir: Path  # relative paths in it resolve from here
    refs: dict[str, str]  # model name -> resolved reference
    space: GenomeSpace
    sources: dict[str, WeightSource] = field(default_factory=dict)  # name -> open source, read once per run
    merger: Merger | None = None
    evaluators: dict[str, Evaluator] = field(default_factory=dict)
    tokenizer: Any = None

    @property
    def directions(self) -> list[str]:
        n = len(self.config.tasks) if self.config.objectives == "vector" else 1
        return ["maximize"] * n

    def evaluator(self, split: str) -> Evaluator:
        if split not in self.evaluators:
            try:
                self.evaluators[split] = Evaluator(
                    self.config.tasks, self.tokenizer, split=split,  # type: ignore[arg-type]
                    device=self.config.device, objectives=self.config.objectives, base_dir=self.base_dir,
                    max_length=context_length(self.space.tokenizer_source().config, self.tokenizer))
            except EvomergeError as exc:
                raise exc.located(self.source, "tasks") from None
        return self.evaluators[split]

    def live_model(self, genome: np.ndarray) -> torch.nn.Module:
        """The merged model of a genome (the very model its exported recipe materializes)."""
        assert self.merger is not None, "build the context with load=True"
        return self.merger.merge(self.space.decode(np.asarray(genome)))


def build_context(config: SearchConfig, text: str, *, source: str, base_dir: Path,
                  refs: dict[str, str] | None = None, load: bool = True, run_dir: Path | None = None) -> RunContext:
    """Resolve models, build the genome space; with `load`, hold weights resident and tokenize the tasks."""
    from evomerge.models.sources import open_model

    refs = refs or config.resolved_models(base_dir)
    sources = {}
    for name, ref in refs.items():
        try:
            sources[name] = open_model(ref)
        except EvomergeError as exc:
            raise ConfigError(exc.detail, file=source, key=f"models.{name}") from None
    space: GenomeSpace
    if config.stacking is not None:
        from evomerge.spaces.stacking import StackSpace

        space = StackSpace(config, refs, sources, source=source, run_dir=run_dir, base_dir=base_dir)
    else:
        from evomerge.spaces.parameter import ParameterSpace

        _check_same_architecture(sources, source)
        n_layers = sources[config.base_model or next(iter(sources))].num_layers()
        space = ParameterSpace(config, refs, n_layers, source=source, sources=sources)
    ctx = RunContext(config, text, source, base_dir, refs, space, sources)
    if load:
        ctx.tokenizer = space.tokenizer_source().tokenizer()
        ctx.merger = space.make_merger(device=config.device, offload=config.offload)
    return ctx


def _check_same_architecture(sources: dict[str, WeightSource], source: str) -> None:
    from evomerge.models.compat import check_mergeable

    try:
        check_mergeable(sources, same_layers=True)
    except EvomergeError as exc:
        raise ConfigError(exc.detail, file=source, key="models") from None


def make_objective(ctx: RunContext, split: str = "search") -> Callable[[np.ndarray], Outcome]:
    """genome -> merge on the device -> score on `split` -> Outcome (what the driver records)."""
    evaluator = ctx.evaluator(split)
    merger = ctx.merger
    assert merger is not None, "build the context with load=True"

    def objective(genome: np.ndarray) -> Outcome:
        candidate = ctx.space.decode(genome)
        recipe_yaml = candidate.to_yaml()
        t0 = time.perf_counter()
        try:
            model = merger.merge(candidate)
            _sync(ctx.config.device)
        except FloatingPointError as exc:
            raise CandidateFailed(f"merge: {exc}", recipe_yaml=recipe_yaml,
                                  merge_seconds=time.perf_counter() - t0) from None
        t1 = time.perf_counter()
        result = evaluator.evaluate(model)
        t2 = time.perf_counter()
        return Outcome(values=result.objectives, metrics=result.metrics, recipe_yaml=recipe_yaml,
                       layer_params=ctx.space.layer_params(genome), merge_seconds=t1 - t0, eval_seconds=t2 - t1)

    return objective


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
