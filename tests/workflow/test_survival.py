"""What a week-long run must survive: kill -9 at random moments (creating the run, searching, writing the
results), SIGTERM from a scheduler, a damaged or empty database (restored from its backups), a full disk,
and budgets that mean the same after a resume."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.search.driver import run_search
from evomerge.search.optimizers import make_optimizer
from evomerge.store import RunStore
from tests.search._scripts.quadratic_search import CONFIG, objective_factory
from tests.workflow.test_run import _space

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evomerge", *args, "--quiet"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finished(run: Path) -> dict[int, tuple]:
    if not (run / "study.db").exists():
        return {}
    store = RunStore.open(run, verify_config=False)
    try:
        return {r.number: (tuple(np.round(r.genome, 12)), tuple(r.values or ()), r.status)
                for r in store.trials() if r.finished}
    finally:
        store.close()


def _completed(run: Path) -> int:
    """Completed trials, read straight from the database: cheap enough to poll between two trials."""
    db = run / "study.db"
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)) as con:
            return int(con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0])
    except sqlite3.Error:
        return 0


def _signature(run: Path) -> list[tuple]:
    return sorted(_finished(run).values())


def test_kill_9_drill(llama_family, tmp_path):
    """10 kills at random moments; after each, nothing finished is lost or changed and the next command
    (run when no run exists yet, else resume) carries on; the end equals an uninterrupted run."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    over = {"budget": {"trials": 16}, "heldout": {"top_k": 1, "sources": True, "baselines": False}}
    space_a, space_b = _space(llama_family, tmp_path / "a", **over), _space(llama_family, tmp_path / "b", **over)
    run = tmp_path / "a" / "run"
    rng = random.Random(7)
    phases: list[str] = []
    seen: dict[int, tuple] = {}
    plan = ["creating the run"] * 2 + ["searching"] * 6 + ["writing the results"] * 2
    for phase in plan:
        if phase == "writing the results" and len(seen) < 16:  # search to the end first, untouched
            proc = _cli("resume", str(run))
            proc.communicate(timeout=600)
            assert proc.returncode == 0
            seen = _finished(run)
        for attempt in range(4):  # a phase that ended before its kill is tried again, sooner
            if phase == "writing the results":
                for name in ("best.yaml", "heldout.json", "heldout.md"):  # as if killed before the results
                    (run / name).unlink(missing_ok=True)
            proc = _cli("resume", str(run)) if (run / "study.db").exists() else _cli("run", str(space_a))
            if phase == "creating the run":
                until = lambda: False  # noqa: E731 - a plain deadline
                delay = rng.uniform(0.5, 3.0) / 2**attempt
            elif phase == "searching":
                target = len(seen) + 1
                until = lambda target=target: _completed(run) >= target  # noqa: E731
                delay = 60.0
            else:
                until = lambda: False  # noqa: E731
                delay = rng.uniform(4.0, 9.0) / 2**attempt  # loads its models, then scores the held-out split
            end = time.monotonic() + delay
            while time.monotonic() < end and proc.poll() is None and not until():
                time.sleep(0.01)
            if phase == "searching":
                time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside the next trial
            if proc.poll() is None:
                break
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
            if phase == "searching":  # the search ended: no trial left to kill
                break
        if proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        phases.append(phase)
        now = _finished(run)
        assert all(now[n] == v for n, v in seen.items())  # nothing finished was lost or changed
        seen = now
    # carry on to the end
    for _ in range(3):
        proc = _cli("resume", str(run)) if (run / "study.db").exists() else _cli("run", str(space_a))
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        if (run / "heldout.json").exists():
            break
    assert len(phases) >= 10 and {"creating the run", "searching"} <= set(phases), phases
    assert len(_finished(run)) == 16 and (run / "best.yaml").exists() and (run / "heldout.json").exists()
    with sqlite3.connect(run / "study.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ref = _cli("run", str(space_b))
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    assert _signature(run) == _signature(tmp_path / "b" / "run")
    assert not list(run.glob(".study-*.creating.db*"))  # what a killed creation left was removed


def test_sigterm_stops_like_ctrl_c_and_resume_finishes(llama_family, tmp_path):
    space = _space(llama_family, tmp_path, budget={"trials": 12},
                   heldout={"top_k": 1, "sources": False, "baselines": False})
    run = tmp_path / "run"
    proc = _cli("run", str(space))
    deadline = time.monotonic() + 300
    while len(_finished(run)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].endswith("interrupted"), err
    store = RunStore.open(run)
    assert not any(r.status == "running" for r in store.trials())  # the trial in flight was marked, not left
    store.close()
    res = _cli("resume", str(run))
    _, err = res.communicate(timeout=600)
    assert res.returncode == 0, err
    assert len(_finished(run)) == 12


def test_trial_budget_given_at_the_start_is_kept_by_resume(llama_family, tmp_path):
    from evomerge.workflow.run import resume_run, start_run

    space = _space(llama_family, tmp_path, budget={"trials": 8},
                   heldout={"top_k": 1, "sources": False, "baselines": False})
    run = start_run(space, quiet=True, max_trials=5)
    assert len(_finished(run)) == 5
    resume_run(run, quiet=True)  # the YAML says 8; the run was started with --trials 5
    assert len(_finished(run)) == 5
    resume_run(run, quiet=True, max_trials=7)
    resume_run(run, quiet=True)
    assert len(_finished(run)) == 7


def test_search_seconds_count_across_resumes(tmp_path):
    store = RunStore.create(tmp_path / "run", CONFIG, directions=["maximize"])

    def slow(x):
        time.sleep(0.1)
        return objective_factory(0.0)(x)

    first = run_search(store, make_optimizer("cmaes", 3, seed=0), slow, max_trials=10_000, max_seconds=1.0)
    assert first.stop_reason == "max_seconds"
    store.close()
    store = RunStore.open(tmp_path / "run", CONFIG)
    assert store.search_seconds() >= 1.0
    second = run_search(store, make_optimizer("cmaes", 3, seed=0), slow, max_trials=10_000, max_seconds=1.0)
    assert second.stop_reason == "max_seconds" and second.evaluated == 0  # the run's hour was already spent


def _quadratic_run(run: Path, trials: int, *extra: str, preexec=None) -> subprocess.CompletedProcess:
    script = Path(__file__).resolve().parents[1] / "search" / "_scripts" / "quadratic_search.py"
    return subprocess.run([sys.executable, str(script), str(run), "--max-trials", str(trials), "--sleep", "0",
                           *extra], capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=preexec)


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "garbled", "empty"])
def test_damaged_database_says_so_and_resumes_from_backup(tmp_path, damage):
    run = tmp_path / "run"
    store = RunStore.create(run, CONFIG, directions=["maximize"])
    run_search(store, make_optimizer("cmaes", 3, seed=0), objective_factory(0.0), max_trials=21, backup_every=7)
    good = sorted((r.number, r.status) for r in store.trials())
    store.close()
    backups = sorted((run / "backups").glob("study-*.db"))
    assert len(backups) == 2  # the newest two are kept
    db = run / "study.db"
    data = db.read_bytes()
    db.write_bytes({"truncated": data[: len(data) // 3], "zeroed": b"\0" * len(data),
                    "garbled": data[:100] + os.urandom(len(data) - 100), "empty": b""}[damage])
    damaged = db.read_bytes()
    with pytest.raises(ConfigError) as err:
        RunStore.open(run, CONFIG)
    msg = str(err.value)
    assert "\n" not in msg and str(db) in msg and "--from-backup" in msg
    assert db.read_bytes() == damaged  # never rewritten over
    from evomerge.store.integrity import restore_latest_backup

    restored = restore_latest_backup(db, run / "backups")
    assert restored == backups[-1]
    aside = [p for p in run.glob("study.db.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged  # kept aside
    store = RunStore.open(run, CONFIG)
    assert sorted((r.number, r.status) for r in store.trials()) == good  # the last backup held every trial


def test_full_disk_says_disk_full(tmp_path):
    import resource

    run = tmp_path / "run"
    assert _quadratic_run(run, 4).returncode == 0
    limit = sum(p.stat().st_size for p in run.glob("study.db*")) + 32 * 1024

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = _quadratic_run(run, 400, preexec=small_files)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "disk is full" in last and str(run) in last, res.stderr[-2000:]
    assert len(_finished(run)) >= 4  # what was recorded stays
