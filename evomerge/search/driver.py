"""The search loop of one worker: take a candidate, evaluate it, record the trial as it finishes.
Knows nothing about models: `objective(genome) -> Outcome`.

Every candidate is a trial in the run's storage, so any number of workers (processes, machines) can
share a run, and a killed worker loses only the candidate it was evaluating:
- optimizers that propose whole generations (CMA-ES): one generation at a time is enqueued as WAITING
  trials that any worker pops; the worker that finds a generation complete tells the optimizer and
  enqueues the next one under a storage lease, with the optimizer's state kept in the storage
  (evomerge/search/generations.py). A run made by several workers, or resumed after kill -9, holds the
  same trials as one uninterrupted worker with the same seed.
- Optuna samplers propose inside trials: a worker reserves a place in the budget under a lease and
  opens a trial the sampler fills; each worker's sampler is seeded from the run seed and its worker slot.
- the budget is counted in the storage and never overshot; a worker with nothing to take waits while
  others finish (a dead worker's trial is failed by its heartbeat or process check and enqueued again).
- a candidate that raises (CUDA OOM included) or returns NaN/inf is recorded "failed" with its reason
  and gets the worst fitness for the optimizer; the run goes on. KeyboardInterrupt (and SIGTERM, which
  the CLI turns into one) marks the trial in flight "interrupted" and leaves the rest for a resume.
- a candidate whose dedupe key matches a finished trial is not evaluated again; the stored result is
  recorded as a new trial with `duplicate_of`. Two workers holding the same candidate at once: one
  evaluates, the other waits for its result (claims in the storage).

Kept as one module on purpose: taking a candidate, evaluating it and recording it share one worker's
session state (budget, clock, dedupe index, heartbeats), and reading them in one place is what makes the
guarantees above checkable.
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
from evomerge.search.generations import WARM_GENERATION, GenerationQueue
from evomerge.search.heartbeat import Heartbeat
from evomerge.search.optimizers import Optimizer
from evomerge.search.progress import Progress, QuietProgress
from evomerge.store import RunStore, TrialRecord
from evomerge.store.integrity import is_disk_full
from evomerge.store.locks import worker_alive
from evomerge.store.run_store import QUEUE_LEASE

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
    evaluated: int  # objective calls by this worker in this session
    failed: int  # of which failed
    duplicates: int  # candidates answered from a stored trial by this worker
    stale: list[int]  # trial numbers this worker found stale (their candidates were enqueued again)
    best: TrialRecord | None
    seconds: float  # this session's wall time
    generations: int  # the optimizer's generation counter at the end
    worker: int  # this worker's slot (0 for the first worker of a run)
    idle_seconds: float  # time this worker waited with nothing to take


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


def run_search(
    store: RunStore,
    optimizer: Optimizer,
    objective: Callable[[np.ndarray], Outcome],
    *,
    max_trials: int,
    max_seconds: float | None = None,
    dedupe_key: Callable[[np.ndarray], str] = genome_key,
    progress: Progress | None = None,
    slot: int | None = None,
    backup_every: int = 0,
    warm_start: list[tuple[str, np.ndarray]] | None = None,
) -> SearchSummary:
    """Work on the search in `store` until `max_trials` finished trials (counted in the storage, across
    resumes and workers), `max_seconds` of the run's search time (across resumes), or the optimizer
    stops. `slot`: this worker's slot (default: registered now); build the optimizer with the same slot
    (`make_optimizer(..., slot=slot)`) so that each worker's sampler draws from its own seed.
    `backup_every`: back up a SQLite run every this many finished trials. `warm_start`: (label, genome)
    pairs scored before the search (CMA-ES then starts at the best; samplers get them as waiting trials)."""
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
    slot = store.register_worker() if slot is None else slot
    stale = store.fail_stale_trials()
    s = _Session(store, optimizer, objective, dedupe_key, progress, int(max_trials), max_seconds, slot,
                 warm_start or [])
    s.backup_every = backup_every
    s.stale = stale
    if optimizer.samples_in_trials:
        state = store.load_optimizer_state(s.state_key)
        if state is not None:
            optimizer.load_state_dict(state)
    store.use_sampler(optimizer.sampler)
    if slot == 0:
        store.set_attr("optimizer", {"name": optimizer.name, "popsize": optimizer.popsize, "seed": optimizer.seed})
    store.set_attr("budget", {"max_trials": int(max_trials), "max_seconds": max_seconds})
    progress.start(max_trials=int(max_trials), finished=store.count_finished(), max_seconds=max_seconds)
    try:
        with Heartbeat(store) as hb:
            s.hb = hb
            stop_reason = s.loop()
        s.tick()
    except Exception as exc:
        if is_disk_full(exc):
            where = str(store.folder.db) if store.on_sqlite else store.storage_url
            raise ConfigError("the disk is full: the run cannot record its trials (everything finished so far is "
                              "kept); free space, then `evomerge resume`", file=where) from None
        raise
    top = store.best(1)
    summary = SearchSummary(
        stop_reason=stop_reason,
        finished=store.count_finished(),
        evaluated=s.evaluated,
        failed=s.failed,
        duplicates=s.duplicates,
        stale=s.stale,
        best=top[0] if top else None,
        seconds=time.monotonic() - t0,
        generations=optimizer.generation,
        worker=slot,
        idle_seconds=s.idle,
    )
    progress.finish(summary)
    return summary


class _Session:
    """State of one worker's `run_search` call."""

    def __init__(self, store: RunStore, optimizer: Optimizer, objective: Callable[[np.ndarray], Outcome],
                 dedupe_key: Callable[[np.ndarray], str], progress: Progress, max_trials: int,
                 max_seconds: float | None, slot: int, warm_start: list[tuple[str, np.ndarray]]):
        self.store, self.opt, self.objective = store, optimizer, objective
        self.dedupe_key, self.progress = dedupe_key, progress
        self.max_trials, self.max_seconds, self.slot = max_trials, max_seconds, slot
        self.state_key = "optimizer" if not optimizer.samples_in_trials else f"sampler:{slot}"
        self.queue = None if optimizer.samples_in_trials else GenerationQueue(
            store, optimizer, max_trials=max_trials, dedupe_key=dedupe_key, warm_start=warm_start)
        self.warm = warm_start
        self.evaluated = self.failed = self.duplicates = 0
        self.idle = 0.0
        self.stale: list[int] = []
        self.backup_every = 0
        self.hb: Heartbeat | None = None
        self.index: dict[str, TrialRecord] = {}  # dedupe key -> first finished trial
        self.best: list[TrialRecord] = []
        self._last_tick = time.time()
        self._used = store.search_seconds()
        self._last_stale_check = time.monotonic()

    # -- budget and clock -----------------------------------------------------------------------
    def tick(self) -> None:
        """Add this worker's time since its last tick to the run's search time."""
        now = time.time()
        self._used = self.store.search_seconds(since=self._last_tick, now=now)
        self._last_tick = now

    def _time_up(self) -> bool:
        if self.max_seconds is None:
            return False
        return self._used + (time.time() - self._last_tick) >= self.max_seconds

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
            if not self.best or sign * rec.values[0] > sign * (self.best[0].values or [0.0])[0]:
                self.best = [rec]

    # -- the loop ---------------------------------------------------------------------------------
    def loop(self) -> str:
        try:
            return self._loop()
        except BaseException:  # Ctrl-C, SIGTERM, a crash: no trial this worker holds stays RUNNING
            self.store.abort_mine("interrupted", "the run was interrupted while evaluating this trial")
            raise

    def _loop(self) -> str:
        while True:
            finished = self._refresh()
            if finished >= self.max_trials:
                if self.queue is not None:  # tell the last complete generation: the state stays current
                    self._advance()
                return "max_trials"
            if self._time_up():
                return "max_seconds"
            trial = self.store.pop_waiting()
            if trial is None:
                trial, stop = self._next_trial()
                if stop is not None:
                    return stop
            if trial is None:  # every candidate is taken: wait for the others (or their trials requeued)
                self._wait()
                continue
            self._run_trial(trial)

    def _next_trial(self) -> tuple[optuna.trial.Trial | None, str | None]:
        if self.queue is not None:
            stop = self._advance()
            if stop is not None and not any(c for k, c in self.store.counts().items() if k != "finished"):
                return None, stop
            return self.store.pop_waiting(), None
        with self.store.lease(QUEUE_LEASE, 60):
            if self.warm and not any(r.generation == WARM_GENERATION for r in self.store.trials()):
                for i, (label, genome) in enumerate(self.warm[: self.max_trials]):  # scored first, by any worker
                    self.store.enqueue(genome, {"generation": WARM_GENERATION, "gen_index": i,
                                                "key": self.dedupe_key(genome), "warm_start": label})
                return self.store.pop_waiting(), None
            c = self.store.counts()
            if c["finished"] + c["running"] + c["waiting"] >= self.max_trials:
                return None, None
            trial = self.store.new_trial()  # takes a waiting trial if one appeared, else a new one
        return trial, None

    def _advance(self) -> str | None:
        assert self.queue is not None
        with self.store.lease(QUEUE_LEASE):
            stop = self.queue.advance()
        for gen, results in self.queue.told:
            self.progress.generation(gen, results, self.best)
        self.queue.told.clear()
        return stop

    def _wait(self) -> None:
        t = time.monotonic()
        if t - self._last_stale_check > STALE_CHECK_SECONDS:
            self.stale += self.store.fail_stale_trials()  # a peer died: its candidate goes back in the queue
            self._last_stale_check = t
        time.sleep(WAIT_POLL_SECONDS)
        self.idle += time.monotonic() - t

    def _run_trial(self, trial: optuna.trial.Trial) -> None:
        attrs = trial.user_attrs
        if self.opt.samples_in_trials and "genome" not in attrs:
            genome = self.opt.sample(trial)
            n = self.store.count_finished()
            gen, index = n // self.opt.popsize, n % self.opt.popsize
        else:
            genome = np.asarray(attrs["genome"], dtype=float) if "genome" in attrs else self.opt.sample(trial)
            gen, index = int(attrs.get("generation", 0)), int(attrs.get("gen_index", 0))
        rec = self._run_one(gen, index, genome, trial)
        if self.opt.samples_in_trials:
            self.opt.generation = max(self.opt.generation, (rec.number + 1) // self.opt.popsize)
            self.store.save_optimizer_state(self.opt.state_dict(), self.state_key)
        self.tick()
        if self.backup_every and rec.finished and self.store.count_finished() % self.backup_every == 0:
            self.store.backup(f"{self.store.count_finished():06d}")

    # -- one candidate ----------------------------------------------------------------------------
    def _run_one(self, gen: int, index: int, genome: np.ndarray, trial: optuna.trial.Trial) -> TrialRecord:
        key = self.dedupe_key(genome)
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

