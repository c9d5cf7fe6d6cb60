"""The run folder `runs/NAME/`: an Optuna SQLite study holding every trial, the config snapshot,
the optimizer checkpoint and the lock that keeps a cma run to one process.

    runs/NAME/config.yaml      the search space as the run started (its sha256 is in the study)
    runs/NAME/study.db         Optuna RDB storage: `optuna-dashboard sqlite:///runs/NAME/study.db`
    runs/NAME/optimizer.pkl    optimizer state after the last finished generation (atomic replace)
    runs/NAME/run.lock         flock: exclusive for single-worker optimizers, shared otherwise

Every trial carries user attrs: genome, generation, gen_index, key, worker, status ("running",
"ok", "failed", "stale", "cancelled", "interrupted"), error, recipe, metrics, merge_seconds,
eval_seconds, layer_params, duplicate_of. A trial is written as soon as it finishes, and SQLite
runs in WAL mode, so kill -9 at any moment loses at most the trials in flight.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import math
import os
import pickle
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import optuna
from optuna.trial import TrialState

from evomerge.errors import ConfigError

CONFIG_NAME = "config.yaml"
DB_NAME = "study.db"
CHECKPOINT_NAME = "optimizer.pkl"
LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 15  # in-flight trials record a heartbeat this often
GRACE_SECONDS = 120  # a RUNNING trial without heartbeat for this long belongs to a dead worker

FINISHED_STATUSES = ("ok", "failed")  # count toward the budget; "stale"/"cancelled"/"interrupted" do not

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of a Linux process (field 22 of /proc/PID/stat): tells a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def this_worker() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start_ticks(pid)}


def worker_alive(worker: dict[str, Any] | None) -> bool | None:
    """True/False for a worker on this host, None when it runs elsewhere (only heartbeats tell)."""
    if not worker or worker.get("host") != socket.gethostname():
        return None
    pid = int(worker.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = worker.get("start")
    return start is None or _proc_start_ticks(pid) in (None, start)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + fsync + os.replace: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass
class TrialRecord:
    """One trial as read back from the study (plain Python, no Optuna objects)."""

    number: int
    state: str  # Optuna state name
    status: str
    values: list[float] | None
    genome: np.ndarray | None
    generation: int | None = None
    gen_index: int | None = None
    key: str | None = None
    recipe_yaml: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    error: str = ""
    layer_params: dict[str, list[float]] | None = None
    duplicate_of: int | None = None
    worker: dict[str, Any] | None = None
    started: _dt.datetime | None = None
    completed: _dt.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def value(self) -> float | None:
        return None if not self.values else self.values[0]


def _record(ft: optuna.trial.FrozenTrial) -> TrialRecord:
    ua = ft.user_attrs
    state = ft.state
    status = ua.get("status")
    if state == TrialState.RUNNING or state == TrialState.WAITING:
        status = "running" if state == TrialState.RUNNING else "waiting"
    elif status in (None, "running"):
        status = "ok" if state == TrialState.COMPLETE else "stale"
    genome = ua.get("genome")
    if genome is None and ft.params:
        genome = [ft.params[k] for k in sorted(ft.params)]
    return TrialRecord(
        number=ft.number,
        state=state.name,
        status=status,
        values=list(ft.values) if ft.values is not None else None,
        genome=None if genome is None else np.asarray(genome, dtype=float),
        generation=ua.get("generation"),
        gen_index=ua.get("gen_index"),
        key=ua.get("key"),
        recipe_yaml=ua.get("recipe", ""),
        metrics=ua.get("metrics") or {},
        merge_seconds=ua.get("merge_seconds"),
        eval_seconds=ua.get("eval_seconds"),
        error=ua.get("error", ""),
        layer_params=ua.get("layer_params"),
        duplicate_of=ua.get("duplicate_of"),
        worker=ua.get("worker"),
        started=ft.datetime_start,
        completed=ft.datetime_complete,
    )


def sqlite_backend(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    """The SQLite RDB storage under `study` (Optuna wraps it in a cache), or None."""
    storage = getattr(study._storage, "_backend", study._storage)
    if isinstance(storage, optuna.storages.RDBStorage) and storage.engine.name == "sqlite":
        return storage
    return None


def write_float_params(study: optuna.Study, trial: optuna.trial.Trial, params: dict[str, float],
                       low: float = 0.0, high: float = 1.0) -> None:
    """Record fixed float parameters of a RUNNING trial in one statement. Equivalent to
    enqueue_trial + suggest_float per gene, which costs a query and a commit per gene (about 6 ms
    each measured here: 0.4 s a trial at 64 genes). Needs `sqlite_backend(study)`."""
    from optuna.distributions import FloatDistribution, distribution_to_json
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy.dialects.sqlite import insert

    storage = sqlite_backend(study)
    assert storage is not None
    dist = distribution_to_json(FloatDistribution(low, high))
    rows = [{"trial_id": trial._trial_id, "param_name": k, "param_value": float(v), "distribution_json": dist}
            for k, v in params.items()]
    with _create_scoped_session(storage.scoped_session, True) as session:
        model = models.TrialModel.find_or_raise_by_id(trial._trial_id, session, for_update=True)
        storage.check_trial_is_updatable(trial._trial_id, model.state)
        session.execute(insert(models.TrialParamModel).values(rows))


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def _make_storage(db_path: Path) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{db_path}",
            engine_kwargs={"connect_args": {"timeout": 60}},
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
        )
    from sqlalchemy import event

    @event.listens_for(storage.engine, "connect")
    def _pragmas(dbapi_conn, _record):  # WAL: writers don't block readers; survives kill -9
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    storage.engine.dispose()  # connections made while creating the tables did not get the pragmas
    return storage


class RunStore:
    """A run folder and its Optuna study. Use `RunStore.create` or `RunStore.open`."""

    def __init__(self, run_dir: Path, storage: optuna.storages.RDBStorage, study: optuna.Study):
        self.run_dir = run_dir
        self.storage = storage
        self.study = study
        self._lock_fh = None

    # -- paths ------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG_NAME

    @property
    def db_path(self) -> Path:
        return self.run_dir / DB_NAME

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.db_path}"

    @staticmethod
    def exists(run_dir: str | os.PathLike) -> bool:
        return (Path(run_dir) / DB_NAME).exists()

    # -- create / open ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        run_dir: str | os.PathLike,
        config_text: str,
        *,
        directions: Sequence[str],
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> "RunStore":
        """Start a new run in `run_dir`: snapshot the config, create the study."""
        run_dir = Path(run_dir)
        dirs = [str(d).lower() for d in directions]
        if not dirs or any(d not in ("maximize", "minimize") for d in dirs):
            raise ConfigError(f"bad objective directions {list(directions)}", key="directions",
                              allowed="a non-empty list of maximize / minimize")
        if cls.exists(run_dir):
            if not overwrite:
                raise ConfigError(
                    f"a run already exists here ({DB_NAME}); resume it (evomerge resume), pick another run folder, or pass --overwrite",
                    file=str(run_dir),
                )
            cls._remove_run_files(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot write the run folder: {exc.strerror or exc}", file=str(run_dir)) from None
        atomic_write_bytes(run_dir / CONFIG_NAME, config_text.encode("utf-8"))
        storage = _make_storage(run_dir / DB_NAME)
        study = optuna.create_study(storage=storage, study_name=run_dir.name or "evomerge", directions=dirs)
        study.set_user_attr("config_sha256", sha256_text(config_text))
        study.set_user_attr("meta", dict(meta or {}))
        study.set_user_attr("created_at", _dt.datetime.now().isoformat(timespec="seconds"))
        return cls(run_dir, storage, study)

    @classmethod
    def open(cls, run_dir: str | os.PathLike, config_text: str | None = None, *, verify_config: bool = True) -> "RunStore":
        """Open an existing run. Refuses when `config.yaml` was edited since the run started, or
        when `config_text` (the search space given now) differs from that snapshot."""
        run_dir = Path(run_dir)
        if not cls.exists(run_dir):
            raise ConfigError(f"no run here ({DB_NAME} missing); start one with `evomerge run`", file=str(run_dir))
        storage = _make_storage(run_dir / DB_NAME)
        names = optuna.get_all_study_names(storage)
        if len(names) != 1:
            raise ConfigError(f"expected one study in the run database, found {len(names)}", file=str(run_dir / DB_NAME))
        study = optuna.load_study(study_name=names[0], storage=storage)
        store = cls(run_dir, storage, study)
        if verify_config:
            store.verify_config(config_text)
        return store

    def verify_config(self, config_text: str | None = None) -> None:
        recorded = self.study.user_attrs.get("config_sha256")
        try:
            snapshot = self.config_path.read_text(encoding="utf-8")
        except OSError:
            raise ConfigError("the config snapshot of this run is missing", file=str(self.config_path)) from None
        if recorded is not None and sha256_text(snapshot) != recorded:
            raise ConfigError(
                "was edited after the run started (sha256 differs from the one recorded in study.db); "
                "restore it, or start a new run with the edited search space",
                file=str(self.config_path),
            )
        if config_text is not None and sha256_text(config_text) != sha256_text(snapshot):
            raise ConfigError(
                "the search space given now differs from this run's snapshot; resume with the snapshot "
                "or start a new run",
                file=str(self.config_path),
            )

    @staticmethod
    def _remove_run_files(run_dir: Path) -> None:
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", CHECKPOINT_NAME, CONFIG_NAME, "report.md"):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
        shutil.rmtree(run_dir / "report", ignore_errors=True)

    def close(self) -> None:
        self.unlock()
        self.storage.remove_session()
        self.storage.engine.dispose()

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
        """flock run.lock: exclusive for single-process optimizers (cma), shared for Optuna samplers
        (several workers). The kernel drops the lock when the process dies, even on kill -9."""
        if self._lock_fh is not None:
            return
        fh = open(self.run_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            if exclusive:
                raise ConfigError(
                    "another evomerge process is working on this run; a cmaes run takes one worker "
                    "(use tpe, optuna-cmaes, nsga2 or random for several workers on one run)",
                    file=str(self.run_dir / LOCK_NAME),
                ) from None
            raise ConfigError(
                "a single-worker (cmaes) process is running this run; wait for it to finish",
                file=str(self.run_dir / LOCK_NAME),
            ) from None
        self._lock_fh = fh
        self._lock_exclusive = exclusive

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    # -- writing trials ---------------------------------------------------------------------------
    def begin_trial(self, trial: optuna.trial.Trial, genome: np.ndarray, *, generation: int, gen_index: int,
                    key: str) -> None:
        """Tag a freshly asked RUNNING trial with what it stands for and who evaluates it."""
        self.record_heartbeat(trial)
        self._set_user_attrs(trial._trial_id, {
            "worker": this_worker(),
            "genome": [float(x) for x in genome],
            "generation": int(generation),
            "gen_index": int(gen_index),
            "key": key,
            "status": "running",
        })

    def _set_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Several user attrs in one statement and one commit (Optuna's public call costs a query
        and a commit per attr). Uses Optuna's SQLite table layout; falls back to the public call."""
        try:
            import json

            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session
            from sqlalchemy.dialects.sqlite import insert
        except ImportError:
            for k, v in attrs.items():
                self.study._storage.set_trial_user_attr(trial_id, k, v)
            return
        model = models.TrialUserAttributeModel
        rows = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
        with _create_scoped_session(self.storage.scoped_session, True) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            self.storage.check_trial_is_updatable(trial_id, trial.state)
            stmt = insert(model).values(rows)
            session.execute(stmt.on_conflict_do_update(index_elements=[model.trial_id, model.key],
                                                       set_={"value_json": stmt.excluded.value_json}))

    def record_heartbeat(self, trial: optuna.trial.Trial | int) -> None:
        trial_id = trial if isinstance(trial, int) else trial._trial_id
        self.storage.record_heartbeat(trial_id)

    def finish_trial(
        self,
        trial: optuna.trial.Trial,
        *,
        values: Sequence[float] | None,
        status: str,
        error: str = "",
        metrics: dict[str, Any] | None = None,
        recipe_yaml: str = "",
        layer_params: dict[str, Sequence[float]] | None = None,
        merge_seconds: float | None = None,
        eval_seconds: float | None = None,
        duplicate_of: int | None = None,
    ) -> None:
        """Write the outcome of a trial: COMPLETE with `values` when status is "ok", else FAIL."""
        attrs: dict[str, Any] = {
            "recipe": recipe_yaml or "",
            "metrics": _jsonable(metrics or {}),
            "merge_seconds": merge_seconds,
            "eval_seconds": eval_seconds,
            "error": error,
        }
        if layer_params:
            attrs["layer_params"] = {str(k): [float(x) for x in v] for k, v in layer_params.items()}
        if duplicate_of is not None:
            attrs["duplicate_of"] = int(duplicate_of)
        attrs["status"] = status
        self._set_user_attrs(trial._trial_id, attrs)
        if status == "ok":
            assert values is not None and all(math.isfinite(v) for v in values)
            self.study.tell(trial, list(values))
        else:
            self.study.tell(trial, state=TrialState.FAIL)

    def abort_trial(self, trial: optuna.trial.Trial | int, status: str, reason: str) -> None:
        """Finish an unevaluated trial (cancelled by the budget, interrupted, stale) as FAIL."""
        trial_id = trial if isinstance(trial, int) else trial._trial_id
        try:
            self._set_user_attrs(trial_id, {"error": reason, "status": status})
            self.study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            pass  # another process finished it first

    def fail_stale_trials(self, *, all_running: bool = False) -> list[int]:
        """Mark trials whose worker died as FAIL with status "stale" (they are neither counted nor
        reused). With `all_running` (we hold the exclusive lock, so no other worker lives) every
        RUNNING or WAITING trial is stale; otherwise a trial is stale when its worker process on this
        host is gone or its heartbeat is older than the grace period."""
        try:
            heartbeat_stale = set(self.storage._get_stale_trial_ids(self.study._study_id))
        except Exception:  # private Optuna API; the PID check still works without it
            heartbeat_stale = set()
        now = _dt.datetime.now()
        stale = []
        for ft in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            worker = ft.user_attrs.get("worker")
            if all_running:
                dead = True
            elif ft.state == TrialState.WAITING:
                dead = False  # enqueued by someone for evaluation
            elif ft._trial_id in heartbeat_stale:
                dead = True
            else:
                alive = worker_alive(worker)
                if alive is None and worker is None and ft.datetime_start is not None:
                    # asked but killed before it was tagged: no worker, no heartbeat
                    alive = (now - ft.datetime_start).total_seconds() < GRACE_SECONDS
                dead = alive is False
            if dead:
                who = f"{worker.get('host')}:{worker.get('pid')}" if worker else "unknown worker"
                self.abort_trial(ft._trial_id, "stale", f"worker {who} stopped before finishing this trial")
                stale.append(ft.number)
        return stale

    # -- claims: one evaluation per candidate across workers ----------------------------------------
    def claim(self, key: str, trial: optuna.trial.Trial) -> int:
        """Atomically claim the evaluation of candidate `key` for `trial`; returns the number of the
        trial that owns it (ours, or the one whose result to wait for). A claim whose owner was
        stopped without a result (stale, cancelled, interrupted) passes to the new trial.
        A small table `evomerge_claims` in study.db; SQLite serializes the writes."""
        from sqlalchemy import text

        with self.storage.engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS evomerge_claims "
                              "(key TEXT PRIMARY KEY, trial_id INTEGER NOT NULL)"))
            conn.execute(text("INSERT OR IGNORE INTO evomerge_claims (key, trial_id) VALUES (:k, :t)"),
                         {"k": key, "t": trial._trial_id})
            owner = conn.execute(text("SELECT trial_id FROM evomerge_claims WHERE key = :k"), {"k": key}).scalar_one()
            if owner != trial._trial_id:
                row = conn.execute(text("SELECT t.state, a.value_json FROM trials t LEFT JOIN trial_user_attributes a "
                                        "ON a.trial_id = t.trial_id AND a.key = 'status' WHERE t.trial_id = :t"),
                                   {"t": owner}).first()
                state, status = (row[0], row[1]) if row else ("FAIL", None)
                state = getattr(state, "name", str(state)).split(".")[-1]
                if state == "FAIL" and status not in ('"failed"',):
                    conn.execute(text("UPDATE evomerge_claims SET trial_id = :t WHERE key = :k"),
                                 {"k": key, "t": trial._trial_id})
                    owner = trial._trial_id
        if owner == trial._trial_id:
            return trial.number
        return self.study._storage.get_trial(owner).number

    # -- checkpoints ------------------------------------------------------------------------------
    def save_optimizer_state(self, state: dict[str, Any]) -> None:
        payload = {"format": 1, "saved_at": _dt.datetime.now().isoformat(timespec="seconds"), "state": state}
        atomic_write_bytes(self.checkpoint_path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))

    def load_optimizer_state(self) -> dict[str, Any] | None:
        try:
            data = self.checkpoint_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            payload = pickle.loads(data)
            return payload["state"]
        except Exception as exc:
            raise ConfigError(f"optimizer checkpoint is unreadable ({type(exc).__name__}: {exc}); delete it "
                              "to restart the optimizer from the stored trials", file=str(self.checkpoint_path)) from None

    # -- reading ----------------------------------------------------------------------------------
    def trials(self, *, include_unfinished: bool = True) -> list[TrialRecord]:
        """All trials in trial-number order (stale/cancelled included; see TrialRecord.status)."""
        recs = [_record(ft) for ft in self.study.get_trials(deepcopy=False)]
        if not include_unfinished:
            recs = [r for r in recs if r.finished]
        return recs

    def count_finished(self) -> int:
        return sum(1 for r in self.trials() if r.finished)

    def finished_keys(self) -> dict[str, int]:
        """dedupe key -> number of the first finished (ok or failed) trial with that key."""
        keys: dict[str, int] = {}
        for r in self.trials():
            if r.finished and r.key is not None and r.key not in keys:
                keys[r.key] = r.number
        return keys

    def trial(self, number: int) -> TrialRecord:
        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        return _record(self.study._storage.get_trial(trial_id))

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
        ok.sort(key=lambda r: (-self._signed(r.values)[0], r.number))  # type: ignore[arg-type]
        return ok[:k]

    def pareto(self, *, records: list[TrialRecord] | None = None) -> list[TrialRecord]:
        """Non-dominated distinct ok trials, in trial order."""
        recs = self.trials() if records is None else records
        ok = [r for r in recs if r.status == "ok" and r.duplicate_of is None and r.values]
        signed = [self._signed(r.values) for r in ok]  # type: ignore[arg-type]
        return [r for r, s in zip(ok, signed) if not any(_dominates(o, s) for o in signed)]


def _jsonable(obj: Any) -> Any:
    """Metrics as JSON: numpy scalars/arrays to Python, non-finite floats to strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
