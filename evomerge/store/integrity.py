"""A run database that cannot be lost: checks before it is opened, online backups while it runs, and a
restore that never writes over the damaged file.

SQLite only (a PostgreSQL server keeps its own backups). Backups use SQLite's online backup API, which
copies a consistent snapshot while other connections keep writing; the newest two are kept.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

from evomerge.errors import ConfigError

BACKUPS_KEPT = 2
_DISK_FULL = ("database or disk is full", "disk i/o error", "file too large")


def check_database(db: Path) -> None:
    """Raise a one-line ConfigError when `db` is empty, truncated or not an intact SQLite database."""
    hint = f"; restore the last backup with `evomerge resume {db.parent} --from-backup`"
    try:
        size = db.stat().st_size
    except OSError as exc:
        raise ConfigError(f"cannot read the run database: {exc.strerror or exc}", file=str(db)) from None
    if size == 0:
        raise ConfigError("the run database is empty (a run is never empty: it was cut short or zeroed)" + hint,
                          file=str(db))
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        try:
            result = con.execute("PRAGMA quick_check").fetchone()[0]
            con.execute("SELECT count(*) FROM trials").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"the run database is damaged ({exc})" + hint, file=str(db)) from None
    if result != "ok":
        raise ConfigError(f"the run database is damaged (integrity check: {result})" + hint, file=str(db))


def _copy(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database with the online backup API (other connections may write)."""
    src = sqlite3.connect(str(source), timeout=60)
    try:
        dst = sqlite3.connect(str(target))
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def backup_database(db: Path, folder: Path, label: str) -> Path:
    """A consistent copy of `db` as `folder/study-LABEL.db` (written aside, then renamed); keeps the newest two."""
    folder.mkdir(exist_ok=True)
    final = folder / f"study-{label}.db"
    tmp = folder / f".study-{label}.db.tmp"
    _copy(db, tmp)
    os.replace(tmp, final)
    for old in sorted(folder.glob("study-*.db"), key=lambda p: p.stat().st_mtime)[:-BACKUPS_KEPT]:
        with contextlib.suppress(OSError):
            old.unlink()
    return final


def restore_latest_backup(db: Path, folder: Path) -> Path:
    """Put the newest intact backup in place of `db`; the damaged file is kept aside, never overwritten."""
    candidates = sorted(folder.glob("study-*.db"), key=lambda p: p.stat().st_mtime, reverse=True)
    for backup in candidates:
        try:
            check_database(backup)
        except ConfigError:
            continue
        if db.exists():
            aside = db.with_name(f"{db.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(db, aside)
            for extra in ("-wal", "-shm"):
                side = db.with_name(db.name + extra)
                if side.exists():
                    os.replace(side, aside.with_name(aside.name + extra))
        tmp = db.with_name(f".{db.name}.restoring")
        _copy(backup, tmp)
        os.replace(tmp, db)
        return backup
    raise ConfigError("no intact backup to restore" + (f" in {folder}" if candidates else " (none was made yet)"),
                      file=str(db))


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it (Optuna wraps database errors), says the disk or file size limit is full."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any(k in str(cur).lower() for k in _DISK_FULL) or getattr(cur, "errno", None) in (28, 27):  # ENOSPC, EFBIG
            return True
        cur = cur.__cause__ or cur.__context__
    return False
