"""The one module that touches Optuna's internals (private attributes, its RDB table layout).

Everything else goes through these functions, so an Optuna upgrade that moves them breaks one file:
- the storage set-up (SQLite in WAL mode, heartbeats);
- a trial's storage id, lookups by number, state changes, stale trials by heartbeat;
- bulk writes of a trial's parameters and user attributes in one statement (Optuna's public calls
  commit once per value: 0.4 s a trial at 64 genes);
- the trial queue: enqueue a WAITING trial with its parameters and attributes in one insert, pop one
  atomically (several workers never get the same trial);
- three tables of our own beside Optuna's: `evomerge_claims` (one evaluation per candidate across
  workers), `evomerge_state` (the optimizer's state and other run state, so the storage is the run's one
  source of truth) and `evomerge_leases` (short named locks with an expiry, held by one worker at a time).
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState
from sqlalchemy import Column, Float, Integer, LargeBinary, MetaData, String, Table, event, exc, select, text

from evomerge.store.locks import GRACE_SECONDS, HEARTBEAT_SECONDS, this_worker, worker_alive

_META = MetaData()
CLAIMS = Table("evomerge_claims", _META, Column("key", String(128), primary_key=True),
               Column("trial_id", Integer, nullable=False))
STATE = Table("evomerge_state", _META, Column("key", String(128), primary_key=True),
              Column("value", LargeBinary, nullable=False))
LEASES = Table("evomerge_leases", _META, Column("name", String(128), primary_key=True),
               Column("owner", String(512), nullable=False), Column("expires", Float, nullable=False))


def sqlite_url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


def open_rdb(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url` (SQLite in WAL mode: writers don't block readers, survives kill -9;
    or a server such as PostgreSQL), with our tables beside Optuna's. Several processes may open a new
    database at once: the loser of a race to create the tables retries."""
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                     heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
            if url.startswith("sqlite"):
                event.listen(storage.engine, "connect", _sqlite_pragmas)
                storage.engine.dispose()  # connections made while creating the tables did not get the pragmas
            _META.create_all(storage.engine, checkfirst=True)
            return storage
        except (exc.IntegrityError, exc.ProgrammingError, exc.OperationalError) as err:
            transient = any(k in str(err) for k in ("already exists", "UNIQUE", "locked", "duplicate key"))
            if attempt == 4 or not transient:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def close_rdb(storage: optuna.storages.RDBStorage) -> None:
    storage.remove_session()
    storage.engine.dispose()


def rdb_of(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    """The RDB storage under `study` (Optuna wraps it in a cache), or None for other storages."""
    storage = getattr(study._storage, "_backend", study._storage)
    return storage if isinstance(storage, optuna.storages.RDBStorage) else None


def study_id(study: optuna.Study) -> int:
    return study._study_id


def trial_id(trial: optuna.trial.Trial | optuna.trial.FrozenTrial | int) -> int:
    return trial if isinstance(trial, int) else trial._trial_id


def trial_id_of_number(study: optuna.Study, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def frozen_trial(study: optuna.Study, tid: int) -> optuna.trial.FrozenTrial:
    return study._storage.get_trial(tid)


def fail_trial(storage: optuna.storages.RDBStorage, tid: int, attrs: dict[str, Any]) -> bool:
    """Finish a RUNNING or WAITING trial as FAIL with `attrs`, in one transaction; False when another
    process finished it first (a conditional update: two workers never both fail the same trial)."""
    trials = models.TrialModel.__table__
    with storage.engine.begin() as conn:
        unfinished = trials.c.state.in_([TrialState.RUNNING, TrialState.WAITING])
        res = conn.execute(trials.update().where(trials.c.trial_id == tid, unfinished)
                           .values(state=TrialState.FAIL, datetime_complete=datetime.datetime.now()))
        if res.rowcount != 1:
            return False
        _upsert_attrs(storage, conn, tid, attrs)
    return True


def stale_trials(storage: optuna.storages.RDBStorage, study: optuna.Study) -> set[int]:
    """RUNNING trials whose heartbeat is older than the grace period."""
    return set(storage._get_stale_trial_ids(study._study_id))


def _insert(storage: optuna.storages.RDBStorage, table: Any) -> Any:
    if storage.engine.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def set_user_attrs(storage: optuna.storages.RDBStorage, tid: int, attrs: dict[str, Any]) -> None:
    """Several user attrs of an unfinished trial in one statement and one commit."""
    with _create_scoped_session(storage.scoped_session, True) as session:
        trial = models.TrialModel.find_or_raise_by_id(tid, session, for_update=True)
        storage.check_trial_is_updatable(tid, cast(TrialState, trial.state))
        _upsert_attrs(storage, session, tid, attrs)


def _upsert_attrs(storage: optuna.storages.RDBStorage, conn: Any, tid: int, attrs: dict[str, Any]) -> None:
    table = models.TrialUserAttributeModel.__table__
    rows = [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    stmt = _insert(storage, table).values(rows)
    conn.execute(stmt.on_conflict_do_update(index_elements=[table.c.trial_id, table.c.key],
                                            set_={"value_json": stmt.excluded.value_json}))


def claim(storage: optuna.storages.RDBStorage, key: str, tid: int) -> int:
    """Atomically claim candidate `key` for trial `tid`; returns the id of the trial that owns it.
    A claim whose owner ended without a result (FAIL with a status other than "failed": stale,
    cancelled, interrupted) passes to `tid`."""
    with storage.engine.begin() as conn:
        conn.execute(_insert(storage, CLAIMS).values(key=key, trial_id=tid).on_conflict_do_nothing())
        owner = conn.execute(select(CLAIMS.c.trial_id).where(CLAIMS.c.key == key)).scalar_one()
        if owner != tid:
            row = conn.execute(text("SELECT t.state, a.value_json FROM trials t LEFT JOIN trial_user_attributes a "
                                    "ON a.trial_id = t.trial_id AND a.key = 'status' WHERE t.trial_id = :t"),
                               {"t": owner}).first()
            state, status = (row[0], row[1]) if row else ("FAIL", None)
            state = getattr(state, "name", str(state)).split(".")[-1]
            if state == "FAIL" and status != '"failed"':
                conn.execute(CLAIMS.update().where(CLAIMS.c.key == key).values(trial_id=tid))
                owner = tid
    return int(owner)


def save_state(storage: optuna.storages.RDBStorage, key: str, value: bytes) -> None:
    with storage.engine.begin() as conn:
        stmt = _insert(storage, STATE).values(key=key, value=value)
        conn.execute(stmt.on_conflict_do_update(index_elements=[STATE.c.key], set_={"value": stmt.excluded.value}))


def load_state(storage: optuna.storages.RDBStorage, key: str) -> bytes | None:
    with storage.engine.connect() as conn:
        value = conn.execute(select(STATE.c.value).where(STATE.c.key == key)).scalar_one_or_none()
    return None if value is None else bytes(value)


# -- the trial queue ------------------------------------------------------------------------------------
def enqueue(study: optuna.Study, params: dict[str, float], distributions: dict[str, BaseDistribution],
            user_attrs: dict[str, Any]) -> int:
    """A WAITING trial holding `params` and `user_attrs`, written in one insert; returns its number."""
    template = optuna.trial.create_trial(state=TrialState.WAITING, params=params, distributions=distributions,
                                         user_attrs=user_attrs)
    tid = study._storage.create_new_trial(study._study_id, template_trial=template)
    return frozen_trial(study, tid).number


def pop_waiting(study: optuna.Study, attrs: dict[str, Any]) -> optuna.trial.Trial | None:
    """Take the oldest WAITING trial (now RUNNING) for this process, or None. A conditional update, so
    two workers never take the same trial (Optuna's own pop reads, then writes: on SQLite two processes
    can both pass its check). `attrs` (who took it) are written in the same transaction."""
    storage = rdb_of(study)
    assert storage is not None
    trials = models.TrialModel.__table__
    with storage.engine.connect() as conn:
        waiting = conn.execute(select(trials.c.trial_id)
                               .where(trials.c.study_id == study._study_id, trials.c.state == TrialState.WAITING)
                               .order_by(trials.c.number)).scalars().all()
    for tid in waiting:
        with storage.engine.begin() as conn:
            res = conn.execute(trials.update().where(trials.c.trial_id == tid, trials.c.state == TrialState.WAITING)
                               .values(state=TrialState.RUNNING, datetime_start=datetime.datetime.now()))
            if res.rowcount == 1:
                _upsert_attrs(storage, conn, int(tid), attrs)
        if res.rowcount == 1:
            return optuna.trial.Trial(study, int(tid))
    return None


# -- leases: short named locks across processes and machines --------------------------------------------
def acquire_lease(storage: optuna.storages.RDBStorage, name: str, seconds: float, *, wait: float = 600.0) -> str:
    """Hold lock `name` for at most `seconds`; returns the owner token for `release_lease`. A holder that
    dies frees it when the lease expires, or at once when it was a process on this host (so a resume
    right after kill -9 does not wait). Waits up to `wait` seconds."""
    token = json.dumps({"token": uuid.uuid4().hex, **this_worker()})
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        now = time.time()
        with storage.engine.begin() as conn:
            conn.execute(LEASES.delete().where(LEASES.c.name == name, LEASES.c.expires < now))
            conn.execute(_insert(storage, LEASES).values(name=name, owner=token, expires=now + seconds)
                         .on_conflict_do_nothing())
            owner = conn.execute(select(LEASES.c.owner).where(LEASES.c.name == name)).scalar_one_or_none()
            if owner is not None and owner != token and worker_alive(_owner(owner)) is False:
                conn.execute(LEASES.delete().where(LEASES.c.name == name, LEASES.c.owner == owner))
                continue
        if owner == token:
            return token
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run's '{name}' lock stayed busy for {wait:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _owner(owner: str) -> dict[str, Any] | None:
    try:
        value = json.loads(owner)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def release_lease(storage: optuna.storages.RDBStorage, name: str, token: str) -> None:
    with storage.engine.begin() as conn:
        conn.execute(LEASES.delete().where(LEASES.c.name == name, LEASES.c.owner == token))


def state_keys(storage: optuna.storages.RDBStorage, prefix: str) -> dict[str, bytes]:
    """Every state row whose key starts with `prefix`."""
    with storage.engine.connect() as conn:
        rows = conn.execute(select(STATE.c.key, STATE.c.value).where(STATE.c.key.startswith(prefix))).all()
    return {str(k): bytes(v) for k, v in rows}


def insert_state(storage: optuna.storages.RDBStorage, key: str, value: bytes) -> bool:
    """Insert a state row unless the key exists; True when this call inserted it."""
    with storage.engine.begin() as conn:
        res = conn.execute(_insert(storage, STATE).values(key=key, value=value).on_conflict_do_nothing())
    return bool(res.rowcount)


def replace_state(storage: optuna.storages.RDBStorage, key: str, old: bytes, new: bytes) -> bool:
    """Compare-and-set of a state row; True when this call replaced `old` by `new`."""
    with storage.engine.begin() as conn:
        res = conn.execute(STATE.update().where(STATE.c.key == key, STATE.c.value == old).values(value=new))
    return bool(res.rowcount)
