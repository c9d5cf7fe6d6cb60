"""`evomerge run` / `evomerge resume`: config -> genome space -> optimizer -> resident merger -> evaluator ->
run store, then the results: best.yaml (a mergekit recipe), the Pareto set for several objectives, the
held-out table and the report."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from evomerge.config import SearchConfig, load_search_space, parse_search_space
from evomerge.envvars import referenced
from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.search.driver import run_search
from evomerge.search.optimizers import Optimizer, make_optimizer
from evomerge.search.progress import make_progress
from evomerge.store import RunFolder, RunStore, atomic_write_text
from evomerge.store.integrity import restore_latest_backup
from evomerge.threads import apply_threads, choose_threads
from evomerge.workflow.context import RunContext, build_context, make_objective
from evomerge.workflow.heldout import heldout_markdown, heldout_table, score_row
from evomerge.workflow.preflight import preflight


def default_run_dir(config: SearchConfig) -> Path:
    return Path(config.run_dir) if config.run_dir else Path("runs") / config.name


def _quiet_transformers() -> None:
    """Per-model 'Loading weights' bars would drown the run's own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _optimizer(ctx: RunContext, slot: int = 0) -> Optimizer:
    opt = ctx.config.optimizer
    x0 = None
    if ctx.config.seed_recipes:
        seeds = [ctx.space.encode(Recipe.load(_rel(p, ctx.base_dir))) for p in ctx.config.seed_recipes]
        x0 = np.mean(seeds, axis=0)
    else:
        x0 = ctx.space.initial_genome()
    return make_optimizer(opt.name, ctx.space.dim, seed=ctx.config.seed, n_objectives=len(ctx.directions),
                          popsize=opt.popsize, sigma0=opt.sigma0, x0=x0, restarts=opt.restarts, slot=slot,
                          layout=ctx.space.gene_layout())


def _rel(path: str, base_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base_dir / p


def _positive_trials(n: int, source: str) -> int:
    if n < 1:
        raise ConfigError(f"the trial budget must be at least 1, got {n}", file=source, key="budget.trials")
    return n


def start_run(space_path: str | Path, *, run_dir: str | Path | None = None, overwrite: bool = False,
              quiet: bool = False, max_trials: int | None = None, storage: str | None = None) -> Path:
    """`evomerge run`: check everything, create the run, search, write the results. `storage`: a database
    URL (e.g. postgresql://...) that workers on other machines join with `evomerge worker`."""
    _quiet_transformers()
    config, text = load_search_space(space_path)
    apply_threads(choose_threads(config.threads))
    base_dir = Path(space_path).resolve().parent
    folder = RunFolder(run_dir if run_dir else default_run_dir(config))
    if max_trials is not None:
        config.budget.trials = _positive_trials(max_trials, str(space_path))
    if storage is None and folder.exists() and not overwrite:  # fail before loading any weights
        RunStore.create(folder.root, text, directions=["maximize"], overwrite=False)
    checked = preflight(config, str(space_path), base_dir)  # everything a run can check before writing
    if not quiet:
        print(checked.summary())
    with handle_sigterm():
        ctx = build_context(config, text, source=str(space_path), base_dir=base_dir, run_dir=folder.root)
        meta = {"space_file": str(Path(space_path).resolve()), "base_dir": str(base_dir), "refs": ctx.refs,
                "dim": ctx.space.dim, "env": referenced(text)}
        with_selection = any(t.n_selection for t in config.tasks)
        names = ("search", "selection", "heldout") if with_selection else ("search", "heldout")
        splits = {s: ctx.evaluator(s).split_ids() for s in names}
        store = RunStore.create(folder.root, text, directions=ctx.directions, meta=meta, overwrite=overwrite,
                                storage_url=storage)
        store.set_attr("budget_config", {"trials": config.budget.trials, "seconds": config.budget.seconds})
        _write_json(folder.splits, splits)
        return _search_and_finish(ctx, store, quiet=quiet)


def resume_run(run_dir: str | Path, *, quiet: bool = False, max_trials: int | None = None,
               from_backup: bool = False) -> Path:
    """`evomerge resume`: continue a stopped or killed run; started several times, several workers."""
    _quiet_transformers()
    folder = RunFolder(run_dir)
    if from_backup:
        restored = restore_latest_backup(folder.db, folder.backups)
        print(f"restored {restored.name}; the damaged database was kept beside it")
    store = RunStore.open(folder.root)
    return _join(store, quiet=quiet, max_trials=max_trials)


def join_run(storage_url: str, name: str, *, runs_dir: str | Path = "runs", quiet: bool = False) -> Path:
    """`evomerge worker STORAGE NAME`: one more worker on a run kept on a database server."""
    _quiet_transformers()
    return _join(RunStore.join(storage_url, name, runs_dir), quiet=quiet, max_trials=None)


def _join(store: RunStore, *, quiet: bool, max_trials: int | None) -> Path:
    text = store.folder.config.read_text(encoding="utf-8")
    source = str(store.folder.config)
    meta = store.meta
    for var, value in meta.get("env", {}).items():  # ${VAR}s in the snapshot resolve as when the run started
        os.environ.setdefault(var, value)
    config = parse_search_space(text, source=source)
    apply_threads(choose_threads(config.threads))
    budget = store.attrs.get("budget_config") or {}
    config.budget.trials = int(budget.get("trials", config.budget.trials))  # a --trials given at the start
    if max_trials is not None:
        config.budget.trials = _positive_trials(max_trials, source)
        store.set_attr("budget_config", budget | {"trials": config.budget.trials})
    with handle_sigterm():
        ctx = build_context(config, text, source=source, base_dir=Path(meta["base_dir"]), refs=meta["refs"],
                            run_dir=store.run_dir)
        if ctx.space.dim != meta["dim"]:
            raise ConfigError(f"the search space now has {ctx.space.dim} genes, the run {meta['dim']}", file=source)
        return _search_and_finish(ctx, store, quiet=quiet)


@contextlib.contextmanager
def handle_sigterm() -> Iterator[None]:
    """SIGTERM (what cluster schedulers send) stops a run as Ctrl-C does: the trial in flight is marked
    interrupted, everything finished stays, and `evomerge resume` continues."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _search_and_finish(ctx: RunContext, store: RunStore, *, quiet: bool) -> Path:
    slot = store.register_worker()
    optimizer = _optimizer(ctx, slot)
    store.use_genes(ctx.space.gene_layout())
    warm = ctx.space.baseline_genomes() if ctx.config.warm_start and not ctx.config.seed_recipes else []
    summary = run_search(store, optimizer, make_objective(ctx), max_trials=ctx.config.budget.trials,
                         max_seconds=ctx.config.budget.seconds, dedupe_key=ctx.space.dedupe_key,
                         progress=make_progress(quiet=quiet), slot=slot, backup_every=optimizer.popsize,
                         warm_start=warm)
    with store.lease("finish", 3600):
        done = store.attrs.get("results_for")
        written = store.folder.best.exists() and store.folder.heldout_json.exists()
        if done != summary.finished or not written:  # written once per state of the run, by one worker
            finish_run(ctx, store, quiet=quiet)
            store.set_attr("results_for", summary.finished)
            store.backup(f"{summary.finished:06d}")
    if not quiet:
        print(f"{summary.finished} trials ({summary.failed} failed in this session); results in {store.run_dir}")
    return store.run_dir


def finish_run(ctx: RunContext, store: RunStore, *, quiet: bool = True) -> dict[str, Any]:
    """best.yaml, Pareto recipes, held-out table and report."""
    from evomerge.report import write_report

    folder = store.folder
    best = store.best(ctx.config.heldout.top_k)
    if not best:
        raise ConfigError("no trial finished successfully; see the failed trials' reasons with `evomerge report`",
                          file=str(folder.root))
    selection: list[dict[str, Any]] = []
    if any(t.n_selection for t in ctx.config.tasks):  # the exported recipe is the best of the top-k on selection
        scored = [(score_row(ctx, ctx.live_model(np.asarray(r.genome)), "selection")[0]["mean"], i, r)
                  for i, r in enumerate(best)]
        scored.sort(key=lambda x: (-x[0] if np.isfinite(x[0]) else np.inf, x[1]))
        best = [r for _, _, r in scored]
        selection = [{"trial": r.number, "selection_mean": round(float(m), 4), "search_fitness": r.value}
                     for m, _, r in scored]
    atomic_write_text(folder.best, best[0].recipe_yaml)
    if len(ctx.directions) > 1:
        folder.pareto.mkdir(exist_ok=True)
        for rec in store.pareto():
            atomic_write_text(folder.pareto / f"trial_{rec.number:05d}.yaml", rec.recipe_yaml)
    table = heldout_table(ctx, best) | {"selection": selection}
    _write_json(folder.heldout_json, table)
    atomic_write_text(folder.heldout_md, heldout_markdown(table))
    if not quiet:
        print(heldout_markdown(table))
    write_report(folder.root)
    return table


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False))
