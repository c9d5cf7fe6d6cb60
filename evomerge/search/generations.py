"""Whole generations through the storage, for optimizers that propose them (CMA-ES).

The optimizer's state as of its last tell lives in the storage; asking from it gives the current
generation again. Whoever holds the run's "queue" lease advances the queue: when every candidate of
the current generation has finished it tells the optimizer (failed candidates get a fitness below the
generation's worst), saves its state, asks the next generation and enqueues its candidates as WAITING
trials that any worker pops. Every step
checks what the storage already holds, so a holder killed half way leaves work the next holder finishes,
and a candidate whose worker died (its trial failed as stale) is enqueued again.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from evomerge.search.optimizers import Optimizer
from evomerge.store import RunStore, TrialRecord

ACTIVE = ("ok", "failed", "running", "waiting")  # a candidate in one of these needs no new trial


def penalties(values: list[list[float] | None], fallback: list[list[float]], n_obj: int) -> list[float]:
    """Worst fitness for failed candidates: below every ok value of the generation by its spread
    (at least 1), so rank-based cma puts failures last; deterministic given the generation."""
    pool = [v for v in values if v is not None] or fallback
    if not pool:
        return [0.0] * n_obj
    arr = np.asarray(pool, dtype=float)
    lo, hi = arr.min(axis=0), arr.max(axis=0)
    return [float(low - max(1.0, high - low)) for low, high in zip(lo, hi)]


class GenerationQueue:
    """Tell / ask / enqueue for one run; call `advance` while holding the storage's "queue" lease."""

    def __init__(self, store: RunStore, optimizer: Optimizer, *, max_trials: int,
                 dedupe_key: Callable[[np.ndarray], str]):
        self.store, self.opt = store, optimizer
        self.max_trials, self.dedupe_key = max_trials, dedupe_key
        self.told: list[tuple[int, list[TrialRecord]]] = []  # generations this worker told (for progress)
        self.initial = optimizer.state_dict()  # before any ask: the run's first state

    def advance(self) -> str | None:
        """Bring the queue up to date; returns "converged" when the optimizer stops, else None."""
        state = self.store.load_optimizer_state()
        if state is None:  # the first worker to get here fixes the run's initial state
            self.store.save_optimizer_state(self.initial)
            state = self.initial
        self.opt.load_state_dict(state)  # as of the last tell
        records = self.store.trials()
        while True:
            if self.opt.should_stop():
                return "converged"
            gen = self.opt.generation
            asked = self.opt.ask()  # the same generation every time from the same state
            done = _finished_by_index(records, gen)
            if len(done) < len(asked):
                self._enqueue_missing(records, gen, asked)
                return None
            self._tell(gen, asked, done, records)

    def _tell(self, gen: int, asked: list[np.ndarray], done: dict[int, TrialRecord],
              records: list[TrialRecord]) -> None:
        n_obj = self.opt.n_objectives
        results = [done[i] for i in range(len(asked))]
        ok_vals = [r.values if r.status == "ok" and r.values else None for r in results]
        prior = [] if any(v is not None for v in ok_vals) else [
            r.values for r in records if r.status == "ok" and r.values and (r.generation is None or r.generation < gen)]
        worst = penalties(ok_vals, prior, n_obj)
        tell_vals = [v if v is not None else worst for v in ok_vals]
        self.opt.tell(asked, [v[0] if n_obj == 1 else v for v in tell_vals])
        self.store.save_optimizer_state(self.opt.state_dict())
        self.told.append((gen, results))

    def _enqueue_missing(self, records: list[TrialRecord], gen: int, asked: list[np.ndarray]) -> None:
        present = {r.gen_index for r in records if r.generation == gen and r.status in ACTIVE}
        used = sum(1 for r in records if r.status in ACTIVE)
        room = self.max_trials - used
        for i, genome in enumerate(asked):
            if i in present:
                continue
            if room <= 0:
                return
            self.store.enqueue(genome, {"generation": gen, "gen_index": i, "key": self.dedupe_key(genome)})
            room -= 1


def _finished_by_index(records: list[TrialRecord], gen: int) -> dict[int, TrialRecord]:
    out: dict[int, TrialRecord] = {}
    for r in records:
        if r.finished and r.generation == gen and r.gen_index is not None:
            out.setdefault(r.gen_index, r)
    return out
