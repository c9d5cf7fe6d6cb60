"""A throwaway PostgreSQL cluster for the tests that need a database server.

`.ci/run` starts one from Debian's packages and exports its URL as EVOMERGE_TEST_POSTGRES; without that
variable, `postgres_url()` starts one itself in a temp folder when the server binaries are installed."""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster() -> str | None:
    """Start a cluster owned by the `postgres` user (root may not run the server); returns its URL."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        return None
    root = tempfile.mkdtemp(prefix="evomerge-pg-")
    data, port = os.path.join(root, "data"), _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_user + [initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"], check=True,
                   capture_output=True)
    subprocess.run(as_user + [pg_ctl, "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
                              f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    atexit.register(lambda: subprocess.run(as_user + [pg_ctl, "-D", data, "-m", "immediate", "stop"],
                                           capture_output=True))
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"


_URL: list[str | None] = []


def postgres_url() -> str | None:
    if not _URL:
        _URL.append(os.environ.get("EVOMERGE_TEST_POSTGRES") or start_cluster())
    return _URL[0]
