"""`evomerge run` / `evomerge resume`: wire config -> space -> optimizer -> resident merger -> evaluator -> store.

After the budget: best.yaml (a mergekit recipe), the top-k and the baselines re-scored on the held-out
split (heldout.json / heldout.md), the Pareto set for several objectives (pareto/*.yaml), and the report.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evomerge.config import SearchSpace, load_search_space, parse_search_space
from evomerge.errors import ConfigError, EvomergeError
from evomerge.recipe import Recipe
from evomerge.search.driver import CandidateFailed, Outcome, run_search
from evomerge.space import ParameterSpace
from evomerge.store import RunStore


@dataclass
class RunContext:
    """Everything a run needs, built once (weights resident, data tokenized)."""

    space: SearchSpace
    text: str
    source: str
    base_dir: Path
    refs: dict[str, str]
    pspace: Any  # ParameterSpace or StackSpace: dim, decode(genome) -> candidate, encode, layer_params
    sources: dict[str, Any] = field(default_factory=dict)  # name -> open WeightSource, read once per run
    merger: Any = None
    evaluators: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None

    @property
    def directions(self) -> list[str]:
        n = len(self.space.tasks) if self.space.objectives == "vector" else 1
        return ["maximize"] * n

    def evaluator(self, split: str):
        if split not in self.evaluators:
            from evomerge.evaluate.evaluator import Evaluator

            try:
                self.evaluators[split] = Evaluator(
                    self.space.tasks, self.tokenizer, split=split, device=self.space.device,
                    objectives=self.space.objectives, base_dir=self.base_dir)
            except EvomergeError as exc:
                raise exc.located(self.source, "tasks") from None
        return self.evaluators[split]


def build_context(space: SearchSpace, text: str, *, source: str, base_dir: Path,
                  refs: dict[str, str] | None = None, load: bool = True, run_dir: Path | None = None) -> RunContext:
    """Resolve models, build the genome space; with `load`, hold weights resident and tokenize the tasks."""
    from evomerge.models.loading import open_model

    refs = refs or space.resolved_models(base_dir)
    sources = {}
    for name, ref in refs.items():
        try:
            sources[name] = open_model(ref)
        except EvomergeError as exc:
            raise ConfigError(exc.detail, file=source, key=f"models.{name}") from None
    if space.stacking is not None:
        from evomerge.search.stack_space import StackSpace

        pspace = StackSpace(space, refs, sources, source=source, run_dir=run_dir, base_dir=base_dir)
    else:
        _check_same_architecture(space, sources, source)
        n_layers = sources[space.base_model or next(iter(sources))].num_layers()
        pspace = ParameterSpace(space, refs, n_layers, source=source)
    ctx = RunContext(space, text, source, base_dir, refs, pspace, sources)
    if load:
        target = pspace.sources[pspace.target_index] if space.stacking is not None else sources[pspace_target(space)]
        ctx.tokenizer = target.tokenizer()
        ctx.merger = pspace.make_merger(sources) if hasattr(pspace, "make_merger") else _resident(ctx, sources)
    return ctx


def pspace_target(space: SearchSpace) -> str:
    if space.chat_vector:
        return space.chat_vector.target
    return space.base_model or next(iter(space.models))


def _check_same_architecture(space: SearchSpace, sources: dict, source: str) -> None:
    from evomerge.models.loading import check_mergeable

    try:
        check_mergeable(sources, same_layers=True)
    except EvomergeError as exc:
        raise ConfigError(exc.detail, file=source, key="models") from None


def _resident(ctx: RunContext, sources: dict):
    from evomerge.merge.resident import ResidentMerger
    from evomerge.merge.session import MergeSession

    template = ctx.pspace.decode(np.full(ctx.pspace.dim, 0.5))
    by_ref = {ctx.refs[n]: s for n, s in sources.items()}
    session = MergeSession.open(template, device="cpu", source=ctx.source, sources=by_ref)
    return ResidentMerger(template, device=ctx.space.device, offload=ctx.space.offload, source=ctx.source,
                          session=session)


def make_objective(ctx: RunContext, split: str = "search") -> Callable[[np.ndarray], Outcome]:
    evaluator = ctx.evaluator(split)

    def objective(genome: np.ndarray) -> Outcome:
        recipe = ctx.pspace.decode(genome)
        recipe_yaml = recipe.to_yaml()
        t0 = time.perf_counter()
        try:
            model = ctx.merger.merge(recipe)
            _sync(ctx.space.device)
        except FloatingPointError as exc:
            raise CandidateFailed(f"merge: {exc}", recipe_yaml=recipe_yaml,
                                  merge_seconds=time.perf_counter() - t0) from None
        t1 = time.perf_counter()
        result = evaluator.evaluate(model)
        t2 = time.perf_counter()
        return Outcome(values=result.objectives, metrics=result.metrics, recipe_yaml=recipe_yaml,
                       layer_params=ctx.pspace.layer_params(genome), merge_seconds=t1 - t0, eval_seconds=t2 - t1)

    return objective


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _optimizer(ctx: RunContext):
    from evomerge.search.optimizers import make_optimizer

    opt = ctx.space.optimizer
    x0 = None
    if ctx.space.seed_recipes:
        seeds = [ctx.pspace.encode(Recipe.load(_rel(p, ctx.base_dir))) for p in ctx.space.seed_recipes]
        x0 = np.mean(seeds, axis=0)
    elif hasattr(ctx.pspace, "initial_genome"):
        x0 = ctx.pspace.initial_genome()
    return make_optimizer(opt.name, ctx.pspace.dim, seed=ctx.space.seed, n_objectives=len(ctx.directions),
                          popsize=opt.popsize, sigma0=opt.sigma0, x0=x0, restarts=opt.restarts)


def _rel(path: str, base_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base_dir / p


def default_run_dir(space: SearchSpace) -> Path:
    return Path(space.run_dir) if space.run_dir else Path("runs") / space.name


# -- entry points -------------------------------------------------------------------------------------
def _quiet_transformers() -> None:
    """Per-model 'Loading weights' bars would drown the run's own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def start_run(space_path: str | Path, *, run_dir: str | Path | None = None, overwrite: bool = False,
              quiet: bool = False, max_trials: int | None = None) -> Path:
    _quiet_transformers()
    space, text = load_search_space(space_path)
    base_dir = Path(space_path).resolve().parent
    run_dir = Path(run_dir) if run_dir else default_run_dir(space)
    if max_trials is not None:
        space.budget.trials = _positive_trials(max_trials, str(space_path))
    if RunStore.exists(run_dir):
        if not overwrite:  # fail before loading any weights
            RunStore.create(run_dir, text, directions=["maximize"], overwrite=False)
        import shutil

        for stale in ("ps_model", "pareto"):
            shutil.rmtree(run_dir / stale, ignore_errors=True)
    ctx = build_context(space, text, source=str(space_path), base_dir=base_dir, run_dir=run_dir)
    meta = {"space_file": str(Path(space_path).resolve()), "base_dir": str(base_dir), "refs": ctx.refs,
            "dim": ctx.pspace.dim, "env": _referenced_env(text)}
    store = RunStore.create(run_dir, text, directions=ctx.directions, meta=meta, overwrite=overwrite)
    _write_json(run_dir / "splits.json", {s: ctx.evaluator(s).split_ids() for s in ("search", "heldout")})
    return _search_and_finish(ctx, store, quiet=quiet)


def resume_run(run_dir: str | Path, *, quiet: bool = False, max_trials: int | None = None) -> Path:
    _quiet_transformers()
    run_dir = Path(run_dir)
    store = RunStore.open(run_dir)
    text = store.config_path.read_text()
    source = str(store.config_path)
    meta = store.meta
    for var, value in meta.get("env", {}).items():  # ${VAR}s in the snapshot resolve as when the run started
        os.environ.setdefault(var, value)
    space = parse_search_space(text, source=source)
    if max_trials is not None:
        space.budget.trials = _positive_trials(max_trials, source)
    ctx = build_context(space, text, source=source, base_dir=Path(meta["base_dir"]), refs=meta["refs"],
                        run_dir=run_dir)
    if ctx.pspace.dim != meta["dim"]:
        raise ConfigError(f"the search space now has {ctx.pspace.dim} genes, the run {meta['dim']}", file=source)
    return _search_and_finish(ctx, store, quiet=quiet)


def _referenced_env(text: str) -> dict[str, str]:
    """Environment variables a search space refers to (${VAR} / $VAR), with their values now."""
    names = re.findall(r"\$\{(\w+)\}|\$(\w+)", text)
    return {n: os.environ[n] for pair in names for n in pair if n and n in os.environ}


def _positive_trials(n: int, source: str) -> int:
    if n < 1:
        raise ConfigError(f"the trial budget must be at least 1, got {n}", file=source, key="budget.trials")
    return n


def _search_and_finish(ctx: RunContext, store: RunStore, *, quiet: bool) -> Path:
    from evomerge.search.progress import make_progress

    optimizer = _optimizer(ctx)
    summary = run_search(store, optimizer, make_objective(ctx), max_trials=ctx.space.budget.trials,
                         max_seconds=ctx.space.budget.seconds, dedupe_key=ctx.pspace.dedupe_key,
                         progress=make_progress(quiet=quiet))
    finish_run(ctx, store, quiet=quiet)
    if not quiet:
        print(f"{summary.finished} trials ({summary.failed} failed this session); results in {store.run_dir}")
    return store.run_dir


def finish_run(ctx: RunContext, store: RunStore, *, quiet: bool = True) -> dict:
    """best.yaml, Pareto recipes, held-out table and report."""
    from evomerge.report import write_report

    run_dir = store.run_dir
    best = store.best(ctx.space.heldout.top_k)
    if not best:
        raise ConfigError("no trial finished successfully; see the failed trials' reasons with `evomerge report`",
                          file=str(run_dir))
    (run_dir / "best.yaml").write_text(best[0].recipe_yaml or ctx.pspace.decode(best[0].genome).to_yaml())
    if len(ctx.directions) > 1:
        pareto_dir = run_dir / "pareto"
        pareto_dir.mkdir(exist_ok=True)
        for rec in store.pareto():
            (pareto_dir / f"trial_{rec.number:05d}.yaml").write_text(rec.recipe_yaml)
    rows = heldout_rows(ctx, best)
    _write_json(run_dir / "heldout.json", {"rows": rows})
    (run_dir / "heldout.md").write_text(heldout_markdown(rows))
    if not quiet:
        print(heldout_markdown(rows))
    write_report(run_dir)
    return {"rows": rows}


def _score(ctx: RunContext, model, split: str) -> dict[str, Any]:
    try:
        result = ctx.evaluator(split).evaluate(model)
    except EvomergeError:
        raise
    except Exception as exc:  # a held-out row that fails is reported, not fatal: the search results stand
        return {"mean": float("nan"), "error": f"{type(exc).__name__}: {exc}"}
    row: dict[str, Any] = {}
    for task, metrics in result.metrics.items():
        spec = next(s for s in ctx.space.tasks if s.name == task)
        metric = spec.metric or _default_metric(spec.kind)
        row[task] = round(float(metrics.get(metric, float("nan"))), 4)
    row["mean"] = round(float(np.mean([v for k, v in row.items()])), 4)
    return row


def _default_metric(kind: str) -> str:
    from evomerge.evaluate.spec import DEFAULT_METRIC

    return DEFAULT_METRIC[kind]


def heldout_rows(ctx: RunContext, best: list) -> list[dict[str, Any]]:
    """Held-out scores of the source models, the baselines (chosen on the search split) and the top-k."""
    rows: list[dict[str, Any]] = []
    if ctx.space.heldout.sources:
        from evomerge.models.loading import load_causal_lm

        for name, src in ctx.sources.items():  # already open: a GGUF is not dequantized again
            model, _ = load_causal_lm(src, dtype=getattr(torch, ctx.space.dtype), device=ctx.space.device)
            rows.append({"name": f"source: {name}"} | _score(ctx, model, "heldout"))
            del model
    if ctx.space.heldout.baselines and ctx.space.stacking is None:
        from evomerge.merge.resident import ResidentMerger
        from evomerge.search.baselines import uniform_baselines

        mergers: dict[str, ResidentMerger] = {}
        for label, recipes in uniform_baselines(ctx.space, ctx.refs).items():
            chosen, chosen_score = recipes[0], -np.inf
            for recipe in recipes:
                if recipe.merge_method not in mergers:
                    mergers[recipe.merge_method] = ResidentMerger(recipe, device=ctx.space.device, source=ctx.source)
                score = _score(ctx, mergers[recipe.merge_method].merge(recipe), "search")["mean"]
                if score > chosen_score:
                    chosen, chosen_score = recipe, score
            model = mergers[chosen.merge_method].merge(chosen)
            rows.append({"name": f"baseline: {label}"} | _score(ctx, model, "heldout")
                        | {"search_mean": round(chosen_score, 4)})
        del mergers
    for rank, rec in enumerate(best):
        model = ctx.merger.merge(ctx.pspace.decode(np.asarray(rec.genome)))
        rows.append({"name": f"evolved #{rank + 1} (trial {rec.number})"} | _score(ctx, model, "heldout")
                    | {"search_fitness": round(float(rec.values[0]), 4)})
    return rows


def heldout_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = [k for k in rows[0] if k != "name"]
    extra = sorted({k for r in rows for k in r} - set(keys) - {"name"})
    cols = keys + extra
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "Held-out split:\n\n" + "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
