"""Several workers on one run, on SQLite and on a real PostgreSQL server: the budget is exact, no candidate
is evaluated twice, every worker takes a share, a worker killed mid-trial loses only its candidate (run
again by another), and CMA-ES's generations equal a single worker's run with the same seed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from evomerge.search.driver import run_search
from evomerge.search.optimizers import make_optimizer
from evomerge.store import RunStore, backend
from evomerge.store.locks import this_worker
from tests.postgres import postgres_url
from tests.search._scripts.quadratic_search import CONFIG, objective_factory

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "search" / "_scripts" / "quadratic_search.py"


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    """(run folder, storage URL or None for SQLite in the folder)."""
    if request.param == "sqlite":
        return tmp_path / "shared", None
    url = postgres_url()
    if url is None:
        pytest.skip("no PostgreSQL server binaries (CI installs Debian's postgresql)")
    return tmp_path / f"run_{uuid.uuid4().hex[:8]}", url


def _workers(run_dir: Path, url: str | None, args: list[str], n: int,
             slow_first: bool = False) -> list[subprocess.Popen]:
    """n worker processes; with `slow_first` the first one takes 30 s a candidate (to be killed mid-trial)."""
    extra = ["--storage", url] if url else []
    if url is None:  # one worker creates the run, the others join it (as `evomerge resume` would)
        RunStore.create(run_dir, CONFIG, directions=["maximize"]).close()
    return [subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), *args, *extra,
                              *(["--sleep", "30"] if slow_first and i == 0 else [])], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


def _open(run_dir: Path, url: str | None) -> RunStore:
    return RunStore.open(run_dir, CONFIG, storage_url=url)


def _signature(store: RunStore) -> list[tuple]:
    return sorted((r.generation, r.gen_index, tuple(np.round(r.genome, 12)), tuple(r.values or ()), r.status)
                  for r in store.trials() if r.finished)


def _reference(tmp_path: Path, seed: int, max_trials: int) -> list[tuple]:
    ref = RunStore.create(tmp_path / "reference", CONFIG, directions=["maximize"])
    run_search(ref, make_optimizer("cmaes", 4, seed=seed, sigma0=0.3), objective_factory(0.0), max_trials=max_trials)
    return _signature(ref)


def test_three_cmaes_workers_share_generations_like_one_worker(storage, tmp_path):
    run_dir, url = storage
    args = ["--optimizer", "cmaes", "--seed", "4", "--max-trials", "32", "--sleep", "0.1"]  # 4 generations of 8
    procs = _workers(run_dir, url, args, 3)
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    store = _open(run_dir, url)
    finished = [r for r in store.trials() if r.finished]
    assert len(finished) == 32  # the budget is global and never overshot
    assert len({(r.generation, r.gen_index) for r in finished}) == 32  # no candidate evaluated twice
    workers = {r.worker["pid"] for r in finished}
    assert workers == {p.pid for p in procs}  # every worker evaluated a share
    assert _signature(store) == _reference(tmp_path, 4, 32)  # the generations a single worker makes
    idle = [float(out.split("idle=")[1].split()[0]) for out, _ in outs]
    assert all(i < 30 for i in idle), idle  # nobody waited while candidates were waiting


def test_a_worker_killed_mid_trial_loses_only_its_candidate(storage, tmp_path):
    run_dir, url = storage
    args = ["--optimizer", "cmaes", "--seed", "6", "--max-trials", "24", "--sleep", "0.2"]
    procs = _workers(run_dir, url, args, 3, slow_first=True)
    victim = procs[0]
    deadline = time.monotonic() + 120
    store = None
    while time.monotonic() < deadline:  # wait until the victim is evaluating a trial
        time.sleep(0.05)
        try:
            store = store or _open(run_dir, url)
        except Exception:
            continue
        running = [r for r in store.trials() if r.status == "running" and r.worker and r.worker["pid"] == victim.pid]
        if running:
            break
    assert store is not None
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    outs = [p.communicate(timeout=300) for p in procs[1:]]
    assert all(p.returncode == 0 for p in procs[1:]), outs
    recs = store.trials()
    stale = [r for r in recs if r.status == "stale"]
    assert len(stale) == 1 and stale[0].worker["pid"] == victim.pid
    retry = [r for r in recs if r.finished and (r.generation, r.gen_index) == (stale[0].generation, stale[0].gen_index)]
    assert len(retry) == 1 and retry[0].worker["pid"] != victim.pid  # re-run by another worker
    assert sum(r.finished for r in recs) == 24
    assert _signature(store) == _reference(tmp_path, 6, 24)


def test_three_tpe_workers_exact_budget_distinct_seeds(storage, tmp_path):
    run_dir, url = storage
    args = ["--optimizer", "tpe", "--seed", "5", "--max-trials", "18", "--sleep", "0.05", "--dim", "3"]
    procs = _workers(run_dir, url, args, 3)
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    store = _open(run_dir, url)
    finished = [r for r in store.trials() if r.finished]
    assert len(finished) == 18
    evaluated = [r for r in finished if r.duplicate_of is None]
    assert len({r.key for r in evaluated}) == len(evaluated) == 18  # each worker's sampler has its own seed
    assert {r.worker["pid"] for r in finished} == {p.pid for p in procs}
    assert not any(r.status == "running" for r in store.trials())
    assert sorted(int(out.split("worker=")[1].split()[0]) for out, _ in outs) == [0, 1, 2]


def test_pids_of_dead_workers_free_their_slot(tmp_path):
    store = RunStore.create(tmp_path / "r", CONFIG, directions=["maximize"])
    assert store.register_worker() == 0
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # slot 0 now names a process that has exited: the next registration takes it over
    dead = dict(this_worker(), pid=int(gone.stdout), start=None)
    backend.save_state(store.storage, f"{backend.study_id(store.study)}:worker:0", json.dumps(dead).encode())
    assert store.register_worker() == 0
    assert store.register_worker() == 1  # slot 0 is ours and alive now
