"""`RunStore`: a run folder and its Optuna study, the trial records of a search.

A trial is written as soon as it finishes and SQLite runs in WAL mode, so kill -9 at any moment loses
at most the trials in flight. The optimizer's state lives in the same database, so the storage is the
one thing a resume needs.

Kept as one module on purpose: each method is a short, typed operation on one run's storage (the Optuna
internals live in `backend`), and together they are the whole contract the search and the workers rely on.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import pickle
import tempfile
import uuid
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import optuna
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.spaces.genes import GeneLayout
from evomerge.store import backend
from evomerge.store.folder import RunFolder, atomic_write_text
from evomerge.store.integrity import backup_database, check_database, is_disk_full
from evomerge.store.locks import GRACE_SECONDS, this_worker, worker_alive
from evomerge.store.records import TrialRecord, jsonable

optuna.logging.set_verbosity(optuna.logging.WARNING)

OPTIMIZER_STATE = "optimizer"
QUEUE_LEASE = "queue"  # held while the set of waiting / running trials changes (enqueue, reserve, requeue)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _has_study(url: str, name: str) -> bool:
    try:
        return name in optuna.get_all_study_names(url)
    except Exception:  # a server without our tables yet
        return False


class RunStore:
    """A run folder and its Optuna study. Use `RunStore.create` or `RunStore.open`.

    The study lives in `runs/NAME/study.db` (SQLite), or on a database server (`storage_url`, e.g.
    PostgreSQL) for workers on several machines; the run folder then holds the snapshot and the results."""

    def __init__(self, folder: RunFolder, storage: optuna.storages.RDBStorage, study: optuna.Study,
                 storage_url: str | None = None):
        self.folder = folder
        self.storage = storage
        self.study = study
        self.storage_url = storage_url or folder.storage_url
        # our tables are shared by every run in a database (a server holds many): keys carry the study's id
        self._ns = f"{backend.study_id(study)}:"
        self.layout: GeneLayout | None = None

    @property
    def run_dir(self):
        return self.folder.root

    @property
    def on_sqlite(self) -> bool:
        return self.storage_url.startswith("sqlite")

    @staticmethod
    def exists(run_dir: str | os.PathLike) -> bool:
        return RunFolder(run_dir).exists()

    # -- create / open ----------------------------------------------------------------------------
    @classmethod
    def create(cls, run_dir: str | os.PathLike, config_text: str, *, directions: Sequence[str],
               meta: dict[str, Any] | None = None, overwrite: bool = False,
               storage_url: str | None = None) -> RunStore:
        """Start a new run: snapshot the config, create the study. Atomic: the run appears whole (its
        database renamed into place last) or not at all; what a killed creation left is removed here."""
        folder = RunFolder(run_dir)
        dirs = [str(d).lower() for d in directions]
        if not dirs or any(d not in ("maximize", "minimize") for d in dirs):
            raise ConfigError(f"bad objective directions {list(directions)}", key="directions",
                              allowed="a non-empty list of maximize / minimize")
        if storage_url is None and folder.exists() or storage_url is not None and _has_study(storage_url, folder.name):
            if not overwrite:
                raise ConfigError(
                    "a run already exists here (study.db); resume it (evomerge resume), pick another run folder, "
                    "or pass --overwrite", file=str(folder.root if storage_url is None else storage_url))
            if storage_url is None:
                folder.remove_run()
            else:
                optuna.delete_study(study_name=folder.name, storage=storage_url)
        try:
            folder.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder.root, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot write the run folder: {exc.strerror or exc}", file=str(folder.root)) from None
        folder.remove_partial()
        attrs = {"config_sha256": sha256_text(config_text), "meta": dict(meta or {}),
                 "created_at": _dt.datetime.now().isoformat(timespec="seconds")}
        if storage_url is not None:
            attrs["config_text"] = config_text  # workers on other machines read the space from the storage
        try:
            atomic_write_text(folder.config, config_text)
            url = storage_url
            if url is None:  # build the database aside, then rename it into place
                tmp_db = folder.root / f".study-{uuid.uuid4().hex[:8]}.creating.db"
                url = backend.sqlite_url(tmp_db)
            storage = backend.open_rdb(url)
            try:
                study = optuna.create_study(storage=storage, study_name=folder.name, directions=dirs)  # type: ignore[arg-type]
            except optuna.exceptions.DuplicatedStudyError:  # another process created it a moment ago
                raise ConfigError("a run with this name already exists in the storage; join it with "
                                  "`evomerge worker`", file=url) from None
            for key, value in attrs.items():
                study.set_user_attr(key, value)
            if storage_url is None:
                backend.close_rdb(storage)
                os.replace(tmp_db, folder.db)
        except Exception as exc:
            if is_disk_full(exc):
                raise ConfigError("the disk is full: cannot create the run", file=str(folder.root)) from None
            raise
        return cls.open(folder.root, config_text, storage_url=storage_url)

    @classmethod
    def open(cls, run_dir: str | os.PathLike, config_text: str | None = None, *,
             verify_config: bool = True, storage_url: str | None = None) -> RunStore:
        """Open an existing run. Refuses when `config.yaml` was edited since the run started, or
        when `config_text` (the search space given now) differs from that snapshot."""
        folder = RunFolder(run_dir)
        if storage_url is None:
            if not folder.exists():
                raise ConfigError("no run here (study.db missing); start one with `evomerge run`",
                                  file=str(folder.root))
            check_database(folder.db)
        url = storage_url or folder.storage_url
        try:
            storage = backend.open_rdb(url)
            study = optuna.load_study(study_name=folder.name, storage=storage)
        except KeyError:
            raise ConfigError(f"no run named '{folder.name}' in this storage", file=url) from None
        store = cls(folder, storage, study, storage_url)
        if verify_config:
            store.verify_config(config_text)
        return store

    @classmethod
    def join(cls, storage_url: str, name: str, runs_dir: str | os.PathLike = "runs") -> RunStore:
        """A worker joining run `name` on a database server: the search space comes from the storage
        and is snapshotted into `runs_dir/name` on this machine."""
        folder = RunFolder(os.path.join(runs_dir, name))
        storage = backend.open_rdb(storage_url)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise ConfigError(f"no run named '{name}' in this storage", file=storage_url) from None
        text = study.user_attrs.get("config_text")
        if text is None:
            raise ConfigError(f"run '{name}' does not hold its search space", file=storage_url)
        folder.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder.config, text)
        return cls(folder, storage, study, storage_url)

    def verify_config(self, config_text: str | None = None) -> None:
        recorded = self.study.user_attrs.get("config_sha256")
        path = self.folder.config
        try:
            snapshot = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise ConfigError("the config snapshot of this run is missing or unreadable", file=str(path)) from None
        if recorded is not None and sha256_text(snapshot) != recorded:
            raise ConfigError("was edited after the run started (sha256 differs from the one recorded in study.db); "
                              "restore it, or start a new run with the edited search space", file=str(path))
        if config_text is not None and sha256_text(config_text) != sha256_text(snapshot):
            raise ConfigError("the search space given now differs from this run's snapshot; resume with the "
                              "snapshot or start a new run", file=str(path))

    def close(self) -> None:
        backend.close_rdb(self.storage)

    def backup(self, label: str) -> None:
        """An online copy of the SQLite database into runs/NAME/backups (the newest two kept)."""
        if self.on_sqlite:
            backup_database(self.folder.db, self.folder.backups, label)

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

    # -- opening and closing trials -----------------------------------------------------------------
    def use_sampler(self, sampler: optuna.samplers.BaseSampler) -> None:
        """The sampler that fills trials opened by `new_trial` (Optuna samplers propose inside a trial)."""
        self.study.sampler = sampler

    def new_trial(self) -> optuna.trial.Trial:
        """A fresh RUNNING trial for a sampler to fill (the driver records its own heartbeats)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask()
        backend.set_user_attrs(self.storage, backend.trial_id(trial), {"worker": this_worker(), "status": "running"})
        return trial

    def abort_mine(self, status: str, reason: str) -> list[int]:
        """Finish every trial this process holds (RUNNING under its name) as `status`: on an interrupt."""
        me = this_worker()
        mine = [ft for ft in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if ft.user_attrs.get("worker") == me]
        return [ft.number for ft in mine if self.abort_trial(backend.trial_id(ft), status, reason)]

    def enqueue(self, genome: np.ndarray, attrs: dict[str, Any]) -> int:
        """A WAITING trial holding `genome` for any worker to pop; returns its number."""
        layout = self.layout if self.layout is not None and len(self.layout) == len(genome) else GeneLayout.unit(
            len(genome))
        return backend.enqueue(self.study, layout.params(genome), layout.distributions(),
                               {"genome": [float(x) for x in genome], "status": "waiting", **attrs})

    def use_genes(self, layout: GeneLayout) -> None:
        """Name the genes of trials enqueued from now on (readable names in real units for the dashboard)."""
        self.layout = layout

    def pop_waiting(self) -> optuna.trial.Trial | None:
        """The oldest WAITING trial, now RUNNING for this process (atomic across workers), or None."""
        return backend.pop_waiting(self.study, {"worker": this_worker(), "status": "running"})

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

    def abort_trial(self, trial: optuna.trial.Trial | int, status: str, reason: str) -> bool:
        """Finish an unevaluated trial (cancelled by the budget, interrupted, stale) as FAIL; False when
        another process finished it first."""
        return backend.fail_trial(self.storage, backend.trial_id(trial), {"error": reason, "status": status})

    def abort_trial_number(self, number: int, status: str, reason: str) -> bool:
        return self.abort_trial(backend.trial_id_of_number(self.study, number), status, reason)

    def fail_stale_trials(self, *, requeue: bool = True) -> list[int]:
        """Trials whose worker died: FAIL with status "stale" (neither counted nor reused) and, with
        `requeue`, their candidate enqueued again for any worker. A trial is stale when its worker process
        on this host is gone or its heartbeat is older than the grace period (workers elsewhere)."""
        with self.lease(QUEUE_LEASE):  # the set of waiting and running trials changes under one lease
            return self._fail_stale_trials(requeue)

    def _fail_stale_trials(self, requeue: bool) -> list[int]:
        heartbeat_stale = backend.stale_trials(self.storage, self.study)
        now = _dt.datetime.now()
        stale = []
        for ft in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = ft.user_attrs.get("worker")
            tid = backend.trial_id(ft)
            if tid in heartbeat_stale:
                dead = True
            else:
                alive = worker_alive(worker)
                if alive is None and worker is None and ft.datetime_start is not None:
                    # popped or asked but killed before it was tagged: no worker, no heartbeat
                    alive = (now - ft.datetime_start).total_seconds() < GRACE_SECONDS
                dead = alive is False
            if not dead:
                continue
            who = f"{worker.get('host')}:{worker.get('pid')}" if worker else "unknown worker"
            if self.abort_trial(tid, "stale", f"worker {who} stopped before finishing this trial"):
                stale.append(ft.number)
                genome = ft.user_attrs.get("genome")
                if requeue and genome is not None:  # only the worker that failed it enqueues it again
                    self.enqueue(np.asarray(genome), {k: ft.user_attrs[k] for k in ("generation", "gen_index", "key")
                                                       if k in ft.user_attrs} | {"retry_of": ft.number})
        return stale

    def claim(self, key: str, trial: optuna.trial.Trial) -> int:
        """Atomically claim the evaluation of candidate `key` for `trial`; returns the number of the
        trial that owns it (ours, or the one whose result to wait for)."""
        owner = backend.claim(self.storage, self._ns + key, backend.trial_id(trial))
        if owner == backend.trial_id(trial):
            return trial.number
        return backend.frozen_trial(self.study, owner).number

    # -- coordination between workers ------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, name: str, seconds: float = 300.0) -> Iterator[None]:
        """Hold the run-wide lock `name` (across processes and machines) for the block."""
        token = backend.acquire_lease(self.storage, self._ns + name, seconds)
        try:
            yield
        finally:
            backend.release_lease(self.storage, self._ns + name, token)

    def register_worker(self) -> int:
        """This process's worker slot: 0 for the first worker, then 1, 2, ...; a slot whose process on
        this host has died is reused (so a resumed single worker is slot 0 again)."""
        me = json.dumps(this_worker()).encode()
        with self.lease("workers", 30):
            slots = backend.state_keys(self.storage, self._ns + "worker:")
            for k in range(len(slots) + 1):
                key = f"{self._ns}worker:{k}"
                if key not in slots:
                    backend.insert_state(self.storage, key, me)
                    return k
                if worker_alive(json.loads(slots[key])) is False:
                    backend.replace_state(self.storage, key, slots[key], me)
                    return k
        raise AssertionError("unreachable")

    def counts(self) -> dict[str, int]:
        """Trials by kind: finished (ok or failed: what the budget counts), running, waiting."""
        out = {"finished": 0, "running": 0, "waiting": 0}
        for r in self.trials():
            if r.finished:
                out["finished"] += 1
            elif r.status in ("running", "waiting"):
                out[r.status] += 1
        return out

    def search_seconds(self, since: float | None = None, now: float | None = None) -> float:
        """The run's search time across sessions and workers (the union of their working intervals);
        with `since` (this worker's last tick), first add the time since then."""
        with self.lease("clock", 30):
            raw = backend.load_state(self.storage, self._ns + "clock")
            clock = json.loads(raw) if raw else {"used": 0.0, "stamp": 0.0}
            if since is not None:
                now = now if now is not None else _dt.datetime.now().timestamp()
                clock["used"] += max(0.0, now - max(since, clock["stamp"]))
                clock["stamp"] = max(clock["stamp"], now)
                backend.save_state(self.storage, self._ns + "clock", json.dumps(clock).encode())
        return float(clock["used"])

    # -- optimizer state ----------------------------------------------------------------------------
    def save_optimizer_state(self, state: dict[str, Any], key: str = OPTIMIZER_STATE) -> None:
        payload = {"format": 2, "saved_at": _dt.datetime.now().isoformat(timespec="seconds"), "state": state}
        backend.save_state(self.storage, self._ns + key, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))

    def load_optimizer_state(self, key: str = OPTIMIZER_STATE) -> dict[str, Any] | None:
        data = backend.load_state(self.storage, self._ns + key)
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
