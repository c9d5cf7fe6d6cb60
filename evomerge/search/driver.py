"""The search loop: ask a generation, evaluate what is new, record every trial as it finishes,
tell, checkpoint. Knows nothing about models: `objective(genome) -> Outcome`.

What it guarantees (see tests/search/test_driver.py):
- a candidate that raises (CUDA OOM included) or returns NaN/inf is recorded "failed" with its
  reason and gets the worst fitness for the optimizer; the run goes on. KeyboardInterrupt is not
  swallowed (the trial in flight is marked "interrupted").
- a candidate whose dedupe key matches a finished trial is not evaluated again; the stored result is
  recorded as a new trial with `duplicate_of` (so the optimizer and Optuna samplers get a value).
- resume: a cma run restores the checkpoint of the last completed generation, re-asks it (same RNG
  state, same genomes), reuses that generation's finished trials and evaluates only the missing
  ones, so a resumed run with a fixed seed yields the same trials as an uninterrupted one.
- several workers (Optuna samplers only) may share a run: each evaluates only trials it asked, and a
  worker whose candidate is being evaluated by another worker waits for that result.
  A cma run takes one process (exclusive lock on run.lock).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import optuna

from evomerge.errors import ConfigError
from evomerge.search.heartbeat import Heartbeat
from evomerge.search.optimizers import Optimizer
from evomerge.search.progress import Progress, QuietProgress
from evomerge.store import RunStore, TrialRecord
from evomerge.store.locks import worker_alive

WAIT_POLL_SECONDS = 0.2
STALE_CHECK_SECONDS = 5.0


@dataclass
class Outcome:
    """What an objective returns for one genome. `values` are fitness to MAXIMIZE."""

    values: list[float]
    metrics: dict[str, Any] = field(default_factory=dict)
    recipe_yaml: str = ""
    layer_params: dict[str, list[float]] | None = None
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0

    def __post_init__(self) -> None:
        if np.isscalar(self.values):
            self.values = [float(self.values)]  # type: ignore[arg-type]
        else:
            self.values = [float(v) for v in self.values]


class CandidateFailed(Exception):
    """Raise from an objective to fail a candidate while keeping what is known about it
    (its recipe, partial metrics, time spent) in the trial record."""

    def __init__(self, reason: str, *, recipe_yaml: str = "", metrics: dict[str, Any] | None = None,
                 merge_seconds: float | None = None, eval_seconds: float | None = None):
        super().__init__(reason)
        self.recipe_yaml = recipe_yaml
        self.metrics = metrics or {}
        self.merge_seconds = merge_seconds
        self.eval_seconds = eval_seconds


@dataclass
class SearchSummary:
    stop_reason: str  # "max_trials", "max_seconds", "converged"
    finished: int  # finished trials in the store (all sessions, all workers)
    evaluated: int  # objective calls in this session
    failed: int  # of which failed
    duplicates: int  # candidates answered from a stored trial in this session
    reused: int  # finished trials of an interrupted generation taken from the store on resume
    stale: list[int]  # trial numbers marked stale when this session started
    best: TrialRecord | None
    seconds: float
    generations: int  # the optimizer's generation counter at the end


def genome_key(genome: np.ndarray, decimals: int = 12) -> str:
    """Default dedupe key: the genome rounded to `decimals` (a space with a coarser grid should pass
    a key of the recipe it maps to)."""
    arr = np.round(np.asarray(genome, dtype=np.float64), decimals) + 0.0  # +0.0 folds -0.0 into 0.0
    return hashlib.sha1(arr.tobytes()).hexdigest()


def _free_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _reason(exc: BaseException) -> str:
    """'ExceptionType: first line of the message' (a CUDA OOM message is a paragraph)."""
    first = (str(exc).strip().splitlines() or [""])[0][:500]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _penalties(values: list[list[float] | None], fallback: list[list[float]], n_obj: int) -> list[float]:
    """Worst fitness for failed candidates: below every ok value of the generation by its spread
    (at least 1), so rank-based cma puts failures last; deterministic given the generation."""
    pool = [v for v in values if v is not None] or fallback
    if not pool:
        return [0.0] * n_obj
    arr = np.asarray(pool, dtype=float)
    lo, hi = arr.min(axis=0), arr.max(axis=0)
    return [float(low - max(1.0, high - low)) for low, high in zip(lo, hi)]


def run_search(
    store: RunStore,
    optimizer: Optimizer,
    objective: Callable[[np.ndarray], Outcome],
    *,
    max_trials: int,
    max_seconds: float | None = None,
    dedupe_key: Callable[[np.ndarray], str] = genome_key,
    progress: Progress | None = None,
) -> SearchSummary:
    """Run (or resume) the search in `store` until `max_trials` finished trials (counted across
    resumes and workers), `max_seconds` of wall time in this session, or the optimizer stops."""
    if isinstance(max_trials, bool) or not isinstance(max_trials, (int, np.integer)) or max_trials <= 0:
        raise ConfigError(f"max_trials must be a positive integer, got {max_trials!r}", key="max_trials")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ConfigError(f"max_seconds must be positive or unset, got {max_seconds!r}", key="max_seconds")
    if store.n_objectives != optimizer.n_objectives:
        raise ConfigError(
            f"the run has {store.n_objectives} objective(s), the optimizer {optimizer.n_objectives}",
            key="objectives",
        )
    progress = progress or QuietProgress()
    t0 = time.monotonic()
    deadline = None if max_seconds is None else t0 + float(max_seconds)
    n_obj = optimizer.n_objectives

    store.lock(exclusive=not optimizer.parallel_safe)
    try:
        stale = store.fail_stale_trials(all_running=not optimizer.parallel_safe)
        state = store.load_optimizer_state()
        if state is not None:
            optimizer.load_state_dict(state)
        store.use_sampler(optimizer.sampler)
        store.set_attr("budget", {"max_trials": int(max_trials), "max_seconds": max_seconds})
        store.set_attr("optimizer", {"name": optimizer.name, "popsize": optimizer.popsize, "seed": optimizer.seed})

        s = _Session(store, optimizer, objective, dedupe_key, progress, int(max_trials), deadline)
        progress.start(max_trials=int(max_trials), finished=store.count_finished(), max_seconds=max_seconds)
        with Heartbeat(store) as hb:
            s.hb = hb
            stop_reason = s.loop(n_obj)
        summary = SearchSummary(
            stop_reason=stop_reason,
            finished=store.count_finished(),
            evaluated=s.evaluated,
            failed=s.failed,
            duplicates=s.duplicates,
            reused=s.reused,
            stale=stale,
            best=top[0] if (top := store.best(1)) else None,
            seconds=time.monotonic() - t0,
            generations=optimizer.generation,
        )
        progress.finish(summary)
        return summary
    finally:
        store.unlock()


class _Session:
    """State of one `run_search` call."""

    def __init__(self, store: RunStore, optimizer: Optimizer, objective: Callable[[np.ndarray], Outcome],
                 dedupe_key: Callable[[np.ndarray], str], progress: Progress, max_trials: int,
                 deadline: float | None):
        self.store, self.opt, self.objective = store, optimizer, objective
        self.dedupe_key, self.progress = dedupe_key, progress
        self.max_trials, self.deadline = max_trials, deadline
        self.evaluated = self.failed = self.duplicates = self.reused = 0
        self.hb: Heartbeat | None = None
        self.index: dict[str, TrialRecord] = {}  # dedupe key -> first finished trial
        self.best: list[TrialRecord] = []

    def _time_up(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _refresh(self) -> int:
        """Re-read the store (other workers add trials too): dedupe index and best; returns the
        number of finished trials."""
        recs = self.store.trials()
        self.index = {}
        for r in recs:
            if r.finished and r.key is not None and r.duplicate_of is None:
                self.index.setdefault(r.key, r)
        self.best = self.store.best(1, records=recs)
        return sum(1 for r in recs if r.finished)

    def _note(self, rec: TrialRecord) -> None:
        if rec.finished and rec.key is not None and rec.duplicate_of is None:
            self.index.setdefault(rec.key, rec)
        if rec.status == "ok" and rec.duplicate_of is None and rec.values:
            sign = 1.0 if self.store.directions[0] == "maximize" else -1.0
            if not self.best or sign * rec.values[0] > sign * self.best[0].values[0]:  # type: ignore[index]
                self.best = [rec]

    def loop(self, n_obj: int) -> str:
        while True:
            if self.opt.parallel_safe and self.opt.generation > 0:
                self.store.fail_stale_trials()  # a peer worker died: its trials must not stay RUNNING
            finished = self._refresh()
            if finished >= self.max_trials:
                return "max_trials"
            if self._time_up():
                return "max_seconds"
            if self.opt.should_stop():
                return "converged"
            gen = self.opt.generation
            genomes, opened = self._propose(self.max_trials - finished)
            stored = self.store.generation_trials(gen) if self.opt.reproducible_ask else {}
            results: list[TrialRecord | None] = [None] * len(genomes)
            handed: set[int] = set()
            stop: str | None = None
            try:
                for i, genome in enumerate(genomes):
                    rec = stored.get(i)
                    if rec is not None and rec.genome is not None and np.array_equal(rec.genome, genome):
                        results[i] = rec  # finished before an interruption: reuse, do not repeat
                        self.reused += 1
                        continue
                    if finished >= self.max_trials:
                        stop = "max_trials"
                        break
                    if self._time_up():
                        stop = "max_seconds"
                        break
                    handed.add(i)
                    results[i] = self._run_one(gen, i, genome, opened[i])
                    finished += 1
            except BaseException:
                for i, t in enumerate(opened):
                    if t is not None and i not in handed:
                        self.store.abort_trial(t, "interrupted", "the run was interrupted")
                raise
            if stop is not None:
                for i, t in enumerate(opened):  # sampler batches: opened but never evaluated
                    if t is not None and i not in handed:
                        self.store.abort_trial(t, "cancelled", f"budget reached ({stop}) before evaluation")
                return stop
            ok_vals = [r.values if r is not None and r.status == "ok" else None for r in results]
            prior = [r.values for r in self.store.trials() if r.status == "ok" and r.values
                     and (r.generation is None or r.generation < gen)] if all(v is None for v in ok_vals) else []
            worst = _penalties(ok_vals, prior, n_obj)
            tell_vals = [v if v is not None else worst for v in ok_vals]
            self.opt.tell(genomes, [v[0] if n_obj == 1 else v for v in tell_vals])
            self.store.save_optimizer_state(self.opt.state_dict())
            self.progress.generation(gen, [r for r in results if r is not None], self.best)

    def _propose(self, remaining: int) -> tuple[list[np.ndarray], list[optuna.trial.Trial | None]]:
        """The generation's genomes, and the trials already opened for them (samplers propose inside
        trials; a genome from `ask` gets its trial when its turn comes)."""
        if self.opt.samples_in_trials:
            trials = [self.store.new_trial() for _ in range(self.opt.batch_size(remaining))]
            return [self.opt.sample(t) for t in trials], list(trials)
        genomes = self.opt.ask(remaining)
        return genomes, [None] * len(genomes)

    # -- one candidate ----------------------------------------------------------------------------
    def _run_one(self, gen: int, index: int, genome: np.ndarray, trial: optuna.trial.Trial | None) -> TrialRecord:
        key = self.dedupe_key(genome)
        if trial is None:
            trial = self.store.open_trial(genome)
        self.store.begin_trial(trial, genome, generation=gen, gen_index=index, key=key)
        assert self.hb is not None
        self.hb.add(trial)
        try:
            original = self._find_equal(key, trial)
            if original is not None:
                self._finish_duplicate(trial, original)
                self.duplicates += 1
            else:
                self._evaluate(trial, genome)
        except BaseException:
            self.store.abort_trial(trial, "interrupted", "the run was interrupted while evaluating this trial")
            raise
        finally:
            self.hb.discard(trial)
        rec = self.store.trial(trial.number)
        self._note(rec)
        self.progress.trial(rec, self.best)
        return rec

    def _find_equal(self, key: str, trial: optuna.trial.Trial) -> TrialRecord | None:
        """A finished trial with this key, or None to evaluate it here. With several workers
        (Optuna samplers) the key is claimed atomically in the store; when another live worker owns
        it, wait for that result instead of evaluating the same candidate twice."""
        if key in self.index:
            return self.index[key]
        if not self.opt.parallel_safe:  # exclusive lock: this process wrote every trial it sees
            return None
        last_check = time.monotonic()
        while True:
            owner = self.store.claim(key, trial)
            if owner == trial.number:
                return None
            rec = self.store.trial(owner)
            if rec.finished:
                return rec if rec.duplicate_of is None else self.store.trial(rec.duplicate_of)
            if rec.status == "running" and worker_alive(rec.worker) is False:
                self.store.abort_trial_number(owner, "stale", "worker died while evaluating")
                continue
            if self._time_up():
                return None
            if time.monotonic() - last_check > STALE_CHECK_SECONDS:  # owner on another host: heartbeats tell
                self.store.fail_stale_trials()
                last_check = time.monotonic()
            time.sleep(WAIT_POLL_SECONDS)

    def _finish_duplicate(self, trial: optuna.trial.Trial, orig: TrialRecord) -> None:
        self.store.finish_trial(
            trial,
            values=orig.values if orig.status == "ok" else None,
            status=orig.status,
            error=(f"duplicate of trial {orig.number}: {orig.error}" if orig.status != "ok" else ""),
            metrics=orig.metrics,
            recipe_yaml=orig.recipe_yaml,
            layer_params=orig.layer_params,
            merge_seconds=0.0,
            eval_seconds=0.0,
            duplicate_of=orig.number,
        )

    def _evaluate(self, trial: optuna.trial.Trial, genome: np.ndarray) -> None:
        self.evaluated += 1
        t = time.monotonic()
        try:
            out = self.objective(np.array(genome, copy=True))
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - any failure of a candidate is data, not a crash
            if "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower():
                _free_cuda_cache()
            self.failed += 1
            extra = exc if isinstance(exc, CandidateFailed) else None
            self.store.finish_trial(
                trial,
                values=None,
                status="failed",
                error=_reason(exc),
                metrics=extra.metrics if extra else None,
                recipe_yaml=extra.recipe_yaml if extra else "",
                merge_seconds=extra.merge_seconds if extra else None,
                eval_seconds=extra.eval_seconds if extra and extra.eval_seconds is not None else time.monotonic() - t,
            )
            return
        if not isinstance(out, Outcome):
            out = Outcome(values=out)  # a bare float or list
        bad = len(out.values) != self.opt.n_objectives or not all(math.isfinite(v) for v in out.values)
        if bad:
            self.failed += 1
            why = (f"objective returned {len(out.values)} values for {self.opt.n_objectives} objectives"
                   if len(out.values) != self.opt.n_objectives else f"non-finite fitness {out.values}")
        self.store.finish_trial(
            trial,
            values=None if bad else out.values,
            status="failed" if bad else "ok",
            error=why if bad else "",
            metrics=out.metrics,
            recipe_yaml=out.recipe_yaml,
            layer_params=out.layer_params,
            merge_seconds=out.merge_seconds,
            eval_seconds=out.eval_seconds,
        )

