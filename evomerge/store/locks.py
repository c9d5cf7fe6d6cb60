"""Who is working on a run: process identity and liveness (Linux /proc), and the run folder's flock.

A worker is {host, pid, start}: the start time of the process tells a reused PID apart. Liveness can
only be checked on this host; for workers elsewhere only the storage's heartbeats tell.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO, Any

from evomerge.errors import ConfigError

HEARTBEAT_SECONDS = 15  # in-flight trials record a heartbeat this often
GRACE_SECONDS = 120  # a RUNNING trial without heartbeat for this long belongs to a dead worker


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of a Linux process (field 22 of /proc/PID/stat)."""
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


class RunLock:
    """flock on run.lock: exclusive for single-process optimizers (cma), shared for Optuna samplers
    (several workers). The kernel drops the lock when the process dies, even on kill -9."""

    def __init__(self, path: Path):
        self.path = path
        self._fh: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self, exclusive: bool) -> None:
        if self._fh is not None:
            return
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            if exclusive:
                raise ConfigError(
                    "another evomerge process is working on this run; a cmaes run takes one worker "
                    "(use tpe, optuna-cmaes, nsga2 or random for several workers on one run)",
                    file=str(self.path),
                ) from None
            raise ConfigError("a single-worker (cmaes) process is running this run; wait for it to finish",
                              file=str(self.path)) from None
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
