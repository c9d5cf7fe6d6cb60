"""Whole generations through the storage, for optimizers that propose them (CMA-ES).

The optimizer's state as of its last tell lives in the storage; asking from it gives the current
generation again. Whoever holds the run's "queue" lease advances the queue: when every candidate of
the current generation has finished it tells the optimizer (failed candidates get a fitness below the
generation's worst), saves its state, asks the next generation and enqueues its candidates as WAITING
trials that any worker pops. With a warm start, the uniform hand-made merges of the same genome space are
scored first (generation -1) and the optimizer starts at the best of them. Every step
checks what the storage already holds, so a holder killed half way leaves work the next holder finishes,
and a candidate whose worker died (its trial failed as stale) is enqueued again.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from evomerge.search.optimizers import Optimizer
from evomerge.store import RunStore, TrialRecord

ACTIVE = ("ok", "failed", "running", "waiting")  # a candidate in one of these needs no new trial
WARM_GENERATION = -1  # the warm-start candidates (uniform hand-made merges), scored before generation 0


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
                 dedupe_key: Callable[[np.ndarray], str], warm_start: list[tuple[str, np.ndarray]] | None = None):
        self.store, self.opt = store, optimizer
        self.max_trials, self.dedupe_key = max_trials, dedupe_key
        self.warm = list(warm_start or [])  # (label, genome): scored first, as generation -1
        self.told: list[tuple[int, list[TrialRecord]]] = []  # generations this worker told (for progress)

    def advance(self) -> str | None:
        """Bring the queue up to date; returns "converged" when the optimizer stops, else None."""
        state = self.store.load_optimizer_state()
        records = self.store.trials()
        if state is None:  # the first worker to get here fixes the run's initial state
            if self.warm:
                done = _finished_by_index(records, WARM_GENERATION)
                if len(done) < len(self.warm):
                    self._enqueue_missing(records, WARM_GENERATION, [g for _, g in self.warm],
                                          labels=[label for label, _ in self.warm])
                    return None
                self.opt.start_at(self.warm[_best_index(done, len(self.warm))][1])
            state = self.opt.state_dict()
            self.store.save_optimizer_state(state)
        self.opt.load_state_dict(state)  # as of the last tell
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

    def _enqueue_missing(self, records: list[TrialRecord], gen: int, asked: list[np.ndarray],
                         labels: list[str] | None = None) -> None:
        present = {r.gen_index for r in records if r.generation == gen and r.status in ACTIVE}
        used = sum(1 for r in records if r.status in ACTIVE)
        room = self.max_trials - used
        for i, genome in enumerate(asked):
            if i in present:
                continue
            if room <= 0:
                return
            extra = {"warm_start": labels[i]} if labels else {}
            self.store.enqueue(genome, {"generation": gen, "gen_index": i, "key": self.dedupe_key(genome)} | extra)
            room -= 1


def _finished_by_index(records: list[TrialRecord], gen: int) -> dict[int, TrialRecord]:
    out: dict[int, TrialRecord] = {}
    for r in records:
        if r.finished and r.generation == gen and r.gen_index is not None:
            out.setdefault(r.gen_index, r)
    return out


def _best_index(done: dict[int, TrialRecord], n: int) -> int:
    """The warm-start candidate with the best first objective (failed ones last, ties to the first)."""
    def score(i: int) -> float:
        r = done[i]
        return r.values[0] if r.status == "ok" and r.values else -np.inf
    return max(range(n), key=lambda i: (score(i), -i))
