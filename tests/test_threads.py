"""Torch threads chosen for the machine: physical cores split among the evomerge workers on this host (read from a
fake /proc), or the count the space's `threads:` / `--threads` (EVOMERGE_THREADS) asks for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.threads import (
    busy_elsewhere,
    cgroup_cpu_limit,
    choose_threads,
    is_worker_command,
    other_workers,
    physical_cores,
)

ME = 100
PY = "/home/u/.venv/bin/python3"
EVOMERGE = "/home/u/.venv/bin/evomerge"


def _proc(root: Path, table: dict[int, tuple[list[str], str, int]]) -> Path:
    """A fake /proc: pid -> (argv, state, parent pid)."""
    for pid, (argv, state, ppid) in table.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        name = Path(argv[0]).name if argv else "kworker"
        (d / "stat").write_text(f"{pid} ({name} (x)) {state} {ppid} 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 77\n")
    (root / "self").mkdir(exist_ok=True)  # non-numeric entries are not processes
    (root / "uptime").write_text("1.0 1.0\n")
    return root


BASE = {
    1: (["/sbin/init"], "S", 0),
    50: (["bash"], "S", 1),  # the shell this process was started from
    ME: ([PY, EVOMERGE, "run", "space.yaml"], "R", 50),
    101: ([PY, EVOMERGE, "run", "space.yaml"], "S", ME),  # a child of this process (same command line)
    102: (["vim", "evomerge/report.py"], "S", 50),
    103: (["grep", "evomerge"], "S", 50),
    104: (["bash", "-c", "evomerge run other.yaml"], "S", 50),  # a shell, not the worker (that is its child)
    105: ([PY, EVOMERGE, "report", "runs/x"], "S", 50),  # writes a report: no torch work
    106: ([PY, EVOMERGE, "run", "zombie.yaml"], "Z", 50),
    107: ([PY, EVOMERGE, "resume", "runs/stopped"], "T", 50),  # stopped with Ctrl-Z
    108: ([], "S", 2),  # a kernel thread: empty command line
}


def test_alone_it_takes_every_physical_core(tmp_path):
    proc = _proc(tmp_path, BASE)
    assert other_workers(proc, ME) == []
    assert choose_threads(None, environ={}, cores=8, proc=proc, pid=ME) == 8


def test_other_workers_share_the_cores(tmp_path):
    table = dict(BASE)
    table[200] = ([PY, EVOMERGE, "run", "a.yaml"], "R", 104)  # started by the `bash -c` above
    table[201] = (["python", "-m", "evomerge", "--verbose", "resume", "runs/b"], "S", 50)  # a sibling
    proc = _proc(tmp_path, table)
    assert other_workers(proc, ME) == [200, 201]
    assert choose_threads(None, environ={}, cores=8, proc=proc, pid=ME) == 8 // 3
    assert choose_threads(None, environ={}, cores=2, proc=proc, pid=ME) == 1  # never fewer than one
    # the parent of a worker is no other worker: a demo that started this process
    table[50] = ([PY, EVOMERGE, "demo"], "S", 1)
    assert other_workers(_proc(tmp_path / "again", table), ME) == [200, 201]


def _stat(root: Path, per_cpu: dict[int, tuple[int, int]], own: int) -> None:
    """/proc/stat with (busy, idle) ticks per CPU, and /proc/ME/stat with this process's utime + stime."""
    lines = ["cpu  1 1 1 1 1 1 1 1 0 0"]  # the all-CPU line is not read
    lines += [f"cpu{c} {b} 0 0 {i} 0 0 0 0 0 0" for c, (b, i) in per_cpu.items()]
    (root / "stat").write_text("\n".join(lines) + "\nintr 1 2 3\n")
    (root / str(ME)).mkdir(exist_ok=True)
    (root / str(ME) / "stat").write_text(f"{ME} (python) R 50 1 1 0 -1 0 0 0 0 0 {own} 0 0 0 20 0 9 0 77\n")


def test_cores_busy_with_other_jobs_are_left_to_them(tmp_path):
    """Another CPU job (not evomerge: a compiler, a test run) keeps its core; this process's own CPU time is not
    counted against it."""
    _stat(tmp_path, {0: (1000, 1000), 1: (1000, 1000), 2: (0, 0)}, own=500)

    def sample(seconds):  # 20 ticks a CPU pass: CPU 0 fully busy (10 of them this process), CPU 1 idle
        assert seconds == 0.2
        _stat(tmp_path, {0: (1020, 1000), 1: (1000, 1020), 2: (50, 0)}, own=510)

    # (20 busy - 10 own) / 40 ticks x 2 CPUs; CPU 2 is not ours (outside the affinity mask)
    assert busy_elsewhere(tmp_path, ME, sleep=sample, cpus=[0, 1]) == pytest.approx(0.5)
    assert busy_elsewhere(tmp_path / "nothing", ME, sleep=sample, cpus=[0, 1]) == 0.0  # no /proc/stat: none
    proc = _proc(tmp_path / "p", BASE)
    assert choose_threads(None, environ={}, cores=2, proc=proc, pid=ME, busy=1.0) == 1  # one job on 2 cores
    assert choose_threads(None, environ={}, cores=2, proc=proc, pid=ME, busy=0.3) == 2  # a blip is no job
    assert choose_threads(None, environ={}, cores=2, proc=proc, pid=ME, busy=3.0) == 1  # at least one
    assert choose_threads(None, environ={}, cores=16, proc=proc, pid=ME, busy=5.2) == 11
    assert choose_threads(2, environ={}, cores=2, proc=proc, pid=ME, busy=2.0) == 2  # asked for: as asked


def test_a_busy_two_core_machine_gets_one_thread_each(tmp_path):
    table = {1: (["/sbin/init"], "S", 0), ME: ([PY, EVOMERGE, "eval", "runs/x"], "R", 1),
             7: ([PY, "-m", "evomerge.cli", "demo"], "R", 1)}
    assert choose_threads(None, environ={}, cores=2, proc=_proc(tmp_path, table), pid=ME) == 1


@pytest.mark.parametrize("argv, worker", [
    ([PY, EVOMERGE, "run", "s.yaml"], True),
    (["evomerge", "--traceback", "eval", "m", "t.jsonl"], True),
    ([PY, "-m", "evomerge", "worker", "postgresql://h/db", "name"], True),
    ([PY, "-mevomerge", "demo"], True),
    ([PY, EVOMERGE, "validate", "s.yaml"], False),
    ([PY, EVOMERGE, "--help"], False),
    (["less", "evomerge/run.py"], False),
    ([PY, "-m", "pytest", "tests/test_threads.py", "-k", "evomerge run"], False),
    (["/opt/evomerge/bin/python", "train.py", "run"], False),
])
def test_worker_command_lines(argv, worker):
    assert is_worker_command(argv) is worker


def test_requested_and_environment_win(tmp_path):
    proc = _proc(tmp_path, BASE | {300: ([PY, EVOMERGE, "run", "x.yaml"], "R", 1)})
    assert choose_threads(3, environ={}, cores=2, proc=proc, pid=ME) == 3  # the space's threads:
    assert choose_threads(3, environ={"EVOMERGE_THREADS": "5"}, cores=2, proc=proc, pid=ME) == 5  # --threads
    assert choose_threads(None, environ={"EVOMERGE_THREADS": " "}, cores=2, proc=proc, pid=ME) == 1
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="threads.*>= 1"):
            choose_threads(bad, environ={}, proc=proc, pid=ME)
    with pytest.raises(ConfigError, match="EVOMERGE_THREADS"):
        choose_threads(None, environ={"EVOMERGE_THREADS": "two"}, proc=proc, pid=ME)


def test_physical_cores_count_hyperthreads_once_and_honour_a_cgroup_quota(tmp_path):
    import os

    cpus = sorted(os.sched_getaffinity(0))
    sys_cpu = tmp_path / "cpu"
    for cpu in cpus:  # every CPU this process may use is a hyper-thread of core 0
        topo = sys_cpu / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text("0\n")
    assert physical_cores(sys_cpu, tmp_path / "no-cgroup") == 1
    assert physical_cores(tmp_path / "no-topology", tmp_path / "no-cgroup") == len(cpus)  # logical CPUs then
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(cg) is None
    (cg / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(cg) == 2
    (cg / "cpu.max").write_text("50000 100000\n")
    assert physical_cores(tmp_path / "no-topology", cg) == 1


def test_apply_threads_sets_intra_and_inter_op_threads_once():
    code = ("import torch\n"
            "from evomerge.threads import apply_threads\n"
            "apply_threads(2)\n"
            "print(torch.get_num_threads(), torch.get_num_interop_threads())\n"
            "torch.ones(64, 64) @ torch.ones(64, 64)\n"
            "apply_threads(1)\n"  # later calls change intra-op threads; inter-op threads stay (torch allows one set)
            "print(torch.get_num_threads(), torch.get_num_interop_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "2", "1", "2"]
