"""Heartbeats for the trials this process has in flight, from a background thread, so another worker can
tell a slow trial from a dead one (the storage fails trials whose heartbeat is older than the grace period)."""

from __future__ import annotations

import threading
from typing import Any

import optuna

from evomerge.store import RunStore
from evomerge.store.locks import HEARTBEAT_SECONDS


class Heartbeat:
    """Background thread that records Optuna heartbeats for the trials this process has in flight,
    so another worker can tell a slow trial from a dead one."""

    def __init__(self, store: RunStore, interval: float = HEARTBEAT_SECONDS):
        self.store, self.interval = store, interval
        self.trials: dict[int, optuna.trial.Trial] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evomerge-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def add(self, trial: optuna.trial.Trial) -> None:
        with self._lock:
            self.trials[trial.number] = trial

    def discard(self, trial: optuna.trial.Trial) -> None:
        with self._lock:
            self.trials.pop(trial.number, None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                trials = list(self.trials.values())
            for trial in trials:
                try:
                    self.store.record_heartbeat(trial)
                except Exception:
                    pass  # a busy database must not kill the run; the next beat retries
