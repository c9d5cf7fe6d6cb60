"""Every path under a run folder `runs/NAME/`, named once, and writes that readers never see half done.

    config.yaml       the search space as the run started (its sha256 is in the study)
    study.db          the run's storage: Optuna RDB on SQLite (trials, optimizer state, claims)
    backups/          online copies of study.db, the newest two
    splits.json       item ids of every split of every task
    best.yaml         the exported recipe (mergekit YAML)
    pareto/           one recipe per non-dominated trial (several objectives)
    heldout.json/.md  the held-out table
    report.md, report/  plots and tables of the run
    ps_model/         PS+DFS: the parameter-space merge the stacking search runs on
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class RunFolder:
    """The layout of one run folder; creates nothing by itself."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    @property
    def name(self) -> str:
        return self.root.name or "evomerge"

    config = property(lambda self: self.root / "config.yaml")
    db = property(lambda self: self.root / "study.db")
    splits = property(lambda self: self.root / "splits.json")
    best = property(lambda self: self.root / "best.yaml")
    pareto = property(lambda self: self.root / "pareto")
    heldout_json = property(lambda self: self.root / "heldout.json")
    heldout_md = property(lambda self: self.root / "heldout.md")
    report_md = property(lambda self: self.root / "report.md")
    report = property(lambda self: self.root / "report")
    ps_model = property(lambda self: self.root / "ps_model")
    backups = property(lambda self: self.root / "backups")

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.db}"

    def exists(self) -> bool:
        """A run lives here (its database exists)."""
        return self.db.exists()

    def remove_partial(self) -> None:
        """What a creation killed half way left behind (a database being built aside)."""
        for leftover in self.root.glob(".study-*.creating.db*"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def remove_results(self) -> None:
        """Everything a finished run derived from its trials (rewritten by the next finish)."""
        for path in (self.best, self.heldout_json, self.heldout_md, self.report_md):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for folder in (self.report, self.pareto):
            shutil.rmtree(folder, ignore_errors=True)

    def remove_run(self) -> None:
        """The whole run (for --overwrite): database, snapshot, results, PS model."""
        for name in ("study.db", "study.db-wal", "study.db-shm", "config.yaml", "splits.json"):
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()
        shutil.rmtree(self.ps_model, ignore_errors=True)
        shutil.rmtree(self.backups, ignore_errors=True)
        self.remove_results()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + fsync + os.replace: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone who can read the folder
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


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
