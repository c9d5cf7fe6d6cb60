"""Who is working on a run: process identity and liveness (Linux /proc), and heartbeat timings.

A worker is {host, pid, start}: the start time of the process tells a reused PID apart. Liveness can
only be checked on this host; for workers elsewhere only the storage's heartbeats tell.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

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
