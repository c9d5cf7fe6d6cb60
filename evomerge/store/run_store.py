"""`RunStore`: a run folder and its Optuna study, the trial records of a search.

A trial is written as soon as it finishes and SQLite runs in WAL mode, so kill -9 at any moment loses
at most the trials in flight. The optimizer's state lives in the same database, so the storage is the
one thing a resume needs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import pickle
import tempfile
import warnings
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import optuna
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.store import backend
from evomerge.store.folder import RunFolder, atomic_write_text
from evomerge.store.locks import GRACE_SECONDS, RunLock, this_worker, worker_alive
from evomerge.store.records import TrialRecord, jsonable

optuna.logging.set_verbosity(optuna.logging.WARNING)

OPTIMIZER_STATE = "optimizer"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def gene_name(i: int) -> str:
    """Optuna parameter name of gene i (zero padded so the dashboard sorts them)."""
    return f"g{i:04d}"


class RunStore:
    """A run folder and its Optuna study. Use `RunStore.create` or `RunStore.open`."""

    def __init__(self, folder: RunFolder, storage: optuna.storages.RDBStorage, study: optuna.Study):
        self.folder = folder
        self.storage = storage
        self.study = study
        self._lock = RunLock(folder.lock)

    @property
    def run_dir(self):
        return self.folder.root

    @staticmethod
    def exists(run_dir: str | os.PathLike) -> bool:
        return RunFolder(run_dir).exists()

    # -- create / open ----------------------------------------------------------------------------
    @classmethod
    def create(cls, run_dir: str | os.PathLike, config_text: str, *, directions: Sequence[str],
               meta: dict[str, Any] | None = None, overwrite: bool = False) -> RunStore:
        """Start a new run in `run_dir`: snapshot the config, create the study."""
        folder = RunFolder(run_dir)
        dirs = [str(d).lower() for d in directions]
        if not dirs or any(d not in ("maximize", "minimize") for d in dirs):
            raise ConfigError(f"bad objective directions {list(directions)}", key="directions",
                              allowed="a non-empty list of maximize / minimize")
        if folder.exists():
            if not overwrite:
                raise ConfigError(
                    "a run already exists here (study.db); resume it (evomerge resume), pick another run folder, "
                    "or pass --overwrite", file=str(folder.root))
            folder.remove_run()
        try:
            folder.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder.root, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot write the run folder: {exc.strerror or exc}", file=str(folder.root)) from None
        atomic_write_text(folder.config, config_text)
        storage = backend.open_rdb(folder.db)
        study_dirs: list[Literal["minimize", "maximize"]] = [
            "maximize" if d == "maximize" else "minimize" for d in dirs]  # dirs checked above
        study = optuna.create_study(storage=storage, study_name=folder.name, directions=study_dirs)
        study.set_user_attr("config_sha256", sha256_text(config_text))
        study.set_user_attr("meta", dict(meta or {}))
        study.set_user_attr("created_at", _dt.datetime.now().isoformat(timespec="seconds"))
        return cls(folder, storage, study)

    @classmethod
    def open(cls, run_dir: str | os.PathLike, config_text: str | None = None, *,
             verify_config: bool = True) -> RunStore:
        """Open an existing run. Refuses when `config.yaml` was edited since the run started, or
        when `config_text` (the search space given now) differs from that snapshot."""
        folder = RunFolder(run_dir)
        if not folder.exists():
            raise ConfigError("no run here (study.db missing); start one with `evomerge run`", file=str(folder.root))
        storage = backend.open_rdb(folder.db)
        names = optuna.get_all_study_names(storage)
        if len(names) != 1:
            raise ConfigError(f"expected one study in the run database, found {len(names)}", file=str(folder.db))
        study = optuna.load_study(study_name=names[0], storage=storage)
        store = cls(folder, storage, study)
        if verify_config:
            store.verify_config(config_text)
        return store

    def verify_config(self, config_text: str | None = None) -> None:
        recorded = self.study.user_attrs.get("config_sha256")
        path = self.folder.config
        try:
            snapshot = path.read_text(encoding="utf-8")
        except OSError:
            raise ConfigError("the config snapshot of this run is missing", file=str(path)) from None
        if recorded is not None and sha256_text(snapshot) != recorded:
            raise ConfigError("was edited after the run started (sha256 differs from the one recorded in study.db); "
                              "restore it, or start a new run with the edited search space", file=str(path))
        if config_text is not None and sha256_text(config_text) != sha256_text(snapshot):
            raise ConfigError("the search space given now differs from this run's snapshot; resume with the "
                              "snapshot or start a new run", file=str(path))

    def close(self) -> None:
        self.unlock()
        backend.close_rdb(self.storage)

    # -- study-level attributes ---------------------------------------------------------------------
    @property
    def directions(self) -> list[str]:
        return [d.name.lower() for d in self.study.directions]

    @property
    def n_objectives(self) -> int:
        return len(self.study.directions)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.study.user_attrs.get("meta") or {})

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.study.user_attrs)

    def set_attr(self, key: str, value: Any) -> None:
        """Record run-level metadata (JSON-serializable) in the study's user attrs."""
        self.study.set_user_attr(key, value)

    # -- locking ----------------------------------------------------------------------------------
    def lock(self, exclusive: bool) -> None:
        self._lock.acquire(exclusive)

    def unlock(self) -> None:
        self._lock.release()

    # -- opening and closing trials -----------------------------------------------------------------
    def use_sampler(self, sampler: optuna.samplers.BaseSampler) -> None:
        """The sampler that fills trials opened by `new_trial` (Optuna samplers propose inside a trial)."""
        self.study.sampler = sampler

    def new_trial(self) -> optuna.trial.Trial:
        """A fresh RUNNING trial for a sampler to fill (the driver records its own heartbeats)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            return self.study.ask()

    def open_trial(self, genome: np.ndarray) -> optuna.trial.Trial:
        """A RUNNING trial that holds `genome` as its parameters (one bulk insert)."""
        trial = self.new_trial()
        backend.write_float_params(self.storage, backend.trial_id(trial),
                                   {gene_name(i): float(v) for i, v in enumerate(genome)})
        return trial

    def begin_trial(self, trial: optuna.trial.Trial, genome: np.ndarray, *, generation: int, gen_index: int,
                    key: str) -> None:
        """Tag a RUNNING trial with what it stands for and who evaluates it."""
        self.record_heartbeat(trial)
        backend.set_user_attrs(self.storage, backend.trial_id(trial), {
            "worker": this_worker(),
            "genome": [float(x) for x in genome],
            "generation": int(generation),
            "gen_index": int(gen_index),
            "key": key,
            "status": "running",
        })

    def set_trial_attrs(self, trial: optuna.trial.Trial, attrs: dict[str, Any]) -> None:
        """User attrs of an unfinished trial, in one statement."""
        backend.set_user_attrs(self.storage, backend.trial_id(trial), attrs)

    def record_heartbeat(self, trial: optuna.trial.Trial | int) -> None:
        self.storage.record_heartbeat(backend.trial_id(trial))

    def finish_trial(self, trial: optuna.trial.Trial, *, values: Sequence[float] | None, status: str,
                     error: str = "", metrics: dict[str, Any] | None = None, recipe_yaml: str = "",
                     layer_params: Mapping[str, Sequence[float]] | None = None, merge_seconds: float | None = None,
                     eval_seconds: float | None = None, duplicate_of: int | None = None) -> None:
        """Write the outcome of a trial: COMPLETE with `values` when status is "ok", else FAIL."""
        attrs: dict[str, Any] = {
            "recipe": recipe_yaml or "",
            "metrics": jsonable(metrics or {}),
            "merge_seconds": merge_seconds,
            "eval_seconds": eval_seconds,
            "error": error,
        }
        if layer_params:
            attrs["layer_params"] = {str(k): [float(x) for x in v] for k, v in layer_params.items()}
        if duplicate_of is not None:
            attrs["duplicate_of"] = int(duplicate_of)
        attrs["status"] = status
        backend.set_user_attrs(self.storage, backend.trial_id(trial), attrs)
        if status == "ok":
            assert values is not None and all(math.isfinite(v) for v in values)
            self.study.tell(trial, list(values))
        else:
            self.study.tell(trial, state=TrialState.FAIL)

    def abort_trial(self, trial: optuna.trial.Trial | int, status: str, reason: str) -> None:
        """Finish an unevaluated trial (cancelled by the budget, interrupted, stale) as FAIL."""
        tid = backend.trial_id(trial)
        try:
            backend.set_user_attrs(self.storage, tid, {"error": reason, "status": status})
            backend.fail_trial(self.study, tid)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            pass  # another process finished it first

    def abort_trial_number(self, number: int, status: str, reason: str) -> None:
        self.abort_trial(backend.trial_id_of_number(self.study, number), status, reason)

    def fail_stale_trials(self, *, all_running: bool = False) -> list[int]:
        """Mark trials whose worker died as FAIL with status "stale" (neither counted nor reused).
        With `all_running` (we hold the exclusive lock, so no other worker lives) every RUNNING or
        WAITING trial is stale; otherwise a trial is stale when its worker process on this host is
        gone or its heartbeat is older than the grace period."""
        heartbeat_stale = backend.stale_trials(self.storage, self.study)
        now = _dt.datetime.now()
        stale = []
        for ft in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            worker = ft.user_attrs.get("worker")
            tid = backend.trial_id(ft)
            if all_running:
                dead = True
            elif ft.state == TrialState.WAITING:
                dead = False  # enqueued by someone for evaluation
            elif tid in heartbeat_stale:
                dead = True
            else:
                alive = worker_alive(worker)
                if alive is None and worker is None and ft.datetime_start is not None:
                    # asked but killed before it was tagged: no worker, no heartbeat
                    alive = (now - ft.datetime_start).total_seconds() < GRACE_SECONDS
                dead = alive is False
            if dead:
                who = f"{worker.get('host')}:{worker.get('pid')}" if worker else "unknown worker"
                self.abort_trial(tid, "stale", f"worker {who} stopped before finishing this trial")
                stale.append(ft.number)
        return stale

    def claim(self, key: str, trial: optuna.trial.Trial) -> int:
        """Atomically claim the evaluation of candidate `key` for `trial`; returns the number of the
        trial that owns it (ours, or the one whose result to wait for)."""
        owner = backend.claim(self.storage, key, backend.trial_id(trial))
        if owner == backend.trial_id(trial):
            return trial.number
        return backend.frozen_trial(self.study, owner).number

    # -- optimizer state ----------------------------------------------------------------------------
    def save_optimizer_state(self, state: dict[str, Any]) -> None:
        payload = {"format": 2, "saved_at": _dt.datetime.now().isoformat(timespec="seconds"), "state": state}
        backend.save_state(self.storage, OPTIMIZER_STATE, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))

    def load_optimizer_state(self) -> dict[str, Any] | None:
        data = backend.load_state(self.storage, OPTIMIZER_STATE)
        if data is None:
            return None
        try:
            return pickle.loads(data)["state"]
        except Exception as exc:
            raise ConfigError(f"the optimizer state stored in the run is unreadable ({type(exc).__name__}: {exc})",
                              file=str(self.folder.db)) from None

    # -- reading ----------------------------------------------------------------------------------
    def trials(self, *, include_unfinished: bool = True) -> list[TrialRecord]:
        """All trials in trial-number order (stale/cancelled included; see TrialRecord.status)."""
        recs = [TrialRecord.from_frozen(ft) for ft in self.study.get_trials(deepcopy=False)]
        return recs if include_unfinished else [r for r in recs if r.finished]

    def count_finished(self) -> int:
        return sum(1 for r in self.trials() if r.finished)

    def trial(self, number: int) -> TrialRecord:
        return TrialRecord.from_frozen(backend.frozen_trial(self.study, backend.trial_id_of_number(self.study, number)))

    def generation_trials(self, generation: int) -> dict[int, TrialRecord]:
        """gen_index -> finished trial of `generation` (to resume an interrupted generation)."""
        out: dict[int, TrialRecord] = {}
        for r in self.trials():
            if r.finished and r.generation == generation and r.gen_index is not None:
                out.setdefault(r.gen_index, r)
        return out

    def _signed(self, values: Sequence[float]) -> list[float]:
        """Values turned so that larger is better for every objective."""
        return [v if d == "maximize" else -v for v, d in zip(values, self.directions)]

    def best(self, k: int = 1, *, records: list[TrialRecord] | None = None) -> list[TrialRecord]:
        """The k best distinct ok trials (duplicates left out), best first by the first objective.
        `records`: rank these instead of reading the store again."""
        recs = self.trials() if records is None else records
        ok = [r for r in recs if r.status == "ok" and r.duplicate_of is None and r.values]
        ok.sort(key=lambda r: (-self._signed(r.values or [])[0], r.number))
        return ok[:k]

    def pareto(self) -> list[TrialRecord]:
        """Optuna's Pareto front (`study.best_trials`) without trials that repeat a candidate, in trial order."""
        front = sorted(self.study.best_trials, key=lambda ft: ft.number)
        recs = [TrialRecord.from_frozen(ft) for ft in front]
        return [r for r in recs if r.status == "ok" and r.duplicate_of is None]
