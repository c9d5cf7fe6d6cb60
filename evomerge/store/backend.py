"""The one module that touches Optuna's internals (private attributes, its RDB table layout).

Everything else goes through these functions, so an Optuna upgrade that moves them breaks one file:
- the storage set-up (SQLite in WAL mode, heartbeats);
- a trial's storage id, lookups by number, state changes, stale trials by heartbeat;
- bulk writes of a trial's parameters and user attributes in one statement (Optuna's public calls
  commit once per value: 0.4 s a trial at 64 genes);
- two tables of our own beside Optuna's: `evomerge_claims` (one evaluation per candidate across
  workers) and `evomerge_state` (the optimizer's state, so the storage is the run's one source of truth).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.distributions import FloatDistribution, distribution_to_json
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, event, select, text

from evomerge.store.locks import GRACE_SECONDS, HEARTBEAT_SECONDS

_META = MetaData()
CLAIMS = Table("evomerge_claims", _META, Column("key", String(128), primary_key=True),
               Column("trial_id", Integer, nullable=False))
STATE = Table("evomerge_state", _META, Column("key", String(128), primary_key=True),
              Column("value", LargeBinary, nullable=False))


def open_rdb(db_path: Path) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on a SQLite file in WAL mode (writers don't block readers; survives kill -9)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{db_path}",
            engine_kwargs={"connect_args": {"timeout": 60}},
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
        )

    @event.listens_for(storage.engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    storage.engine.dispose()  # connections made while creating the tables did not get the pragmas
    _META.create_all(storage.engine, checkfirst=True)
    return storage


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


def fail_trial(study: optuna.Study, tid: int) -> None:
    study._storage.set_trial_state_values(tid, TrialState.FAIL)


def stale_trials(storage: optuna.storages.RDBStorage, study: optuna.Study) -> set[int]:
    """RUNNING trials whose heartbeat is older than the grace period."""
    return set(storage._get_stale_trial_ids(study._study_id))


def _insert(storage: optuna.storages.RDBStorage, table: Any) -> Any:
    if storage.engine.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def write_float_params(storage: optuna.storages.RDBStorage, tid: int, params: dict[str, float],
                       low: float = 0.0, high: float = 1.0) -> None:
    """Fixed float parameters of a RUNNING trial in one statement (same rows as suggest_float)."""
    dist = distribution_to_json(FloatDistribution(low, high))
    rows = [{"trial_id": tid, "param_name": k, "param_value": float(v), "distribution_json": dist}
            for k, v in params.items()]
    with _create_scoped_session(storage.scoped_session, True) as session:
        model = models.TrialModel.find_or_raise_by_id(tid, session, for_update=True)
        # optuna's model annotates the Column; a loaded row holds the TrialState
        storage.check_trial_is_updatable(tid, cast(TrialState, model.state))
        session.execute(_insert(storage, models.TrialParamModel.__table__).values(rows))


def set_user_attrs(storage: optuna.storages.RDBStorage, tid: int, attrs: dict[str, Any]) -> None:
    """Several user attrs of an unfinished trial in one statement and one commit."""
    table = models.TrialUserAttributeModel.__table__
    rows = [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    with _create_scoped_session(storage.scoped_session, True) as session:
        trial = models.TrialModel.find_or_raise_by_id(tid, session, for_update=True)
        storage.check_trial_is_updatable(tid, cast(TrialState, trial.state))
        stmt = _insert(storage, table).values(rows)
        session.execute(stmt.on_conflict_do_update(index_elements=[table.c.trial_id, table.c.key],
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
