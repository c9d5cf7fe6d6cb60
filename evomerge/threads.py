"""How many torch threads a run uses: one per physical core that nothing else on this host is using.

Oversubscribed cores are catastrophic for torch on CPU: on a 2-core machine with another CPU job running, each
evaluation of the demo's tiny models took 11-17 s with torch's default thread count instead of 0.33 s with one
thread (torch's OpenMP threads wait for each other while they are preempted; a forward pass of the demo's
model measured 7x slower with 2 threads than with 1 beside two busy processes). So the default is not torch's
(one thread per logical CPU) but, at least 1:

    min(physical cores // (1 + other evomerge workers), physical cores - cores busy with other processes)

- physical cores: distinct (package, core) pairs of the CPUs in this process's affinity mask (hyper-threads
  share a core), capped by a cgroup CPU quota (containers started with `--cpus`);
- other evomerge workers: processes whose command line is `evomerge run|resume|eval|demo|worker ...` (the
  console script or `python -m evomerge`), except this process, its parents and its children, and except
  stopped and zombie processes: they share the cores even while they load weights and use none;
- cores busy with other processes: CPU time the host spent outside this process during a 0.2 s sample of
  /proc/stat (CPUs of the affinity mask only), rounded to whole cores; catches CPU jobs that are not evomerge.

Set the count with the search space's `threads: N`, or `--threads N` on `evomerge run`, `resume`, `eval` and
`demo`, which sets the environment variable `EVOMERGE_THREADS` (it wins over the space's setting; CI and scripts
may set it too). Apply it with `apply_threads(choose_threads(config.threads))`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

from evomerge.errors import ConfigError

ENV = "EVOMERGE_THREADS"
WORKER_COMMANDS = frozenset({"run", "resume", "eval", "demo", "worker"})
ENTRY_MODULES = frozenset({"evomerge", "evomerge.cli", "evomerge.__main__"})

log = logging.getLogger("evomerge")
_interop_done = False


def _positive(value: object, where: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"the number of threads must be a whole number >= 1, got {value!r}", key=where,
                          allowed="an integer >= 1, or nothing for one thread per free physical core")
    return n


def choose_threads(requested: int | None, *, environ: Mapping[str, str] | None = None, cores: int | None = None,
                   proc: Path = Path("/proc"), pid: int | None = None, busy: float | None = None) -> int:
    """The torch thread count for this process: `EVOMERGE_THREADS` (what --threads sets), else `requested`
    (the space's `threads:`), else the physical cores that neither other evomerge workers nor other busy
    processes use (see the module docstring). `busy`: physical cores busy elsewhere (None: measure it)."""
    env = os.environ if environ is None else environ
    if env.get(ENV, "").strip():
        return _positive(env[ENV], ENV)
    if requested is not None:
        return _positive(requested, "threads")
    me = os.getpid() if pid is None else pid
    total = physical_cores() if cores is None else cores
    others = other_workers(proc, me)
    if busy is None:
        logical = max(1, len(_affinity()))
        busy = busy_elsewhere(proc, me) * min(1.0, total / logical)
    n = max(1, min(total // (1 + len(others)), total - int(busy + 0.5)))
    log.info("torch threads: %d (%d physical cores, %.1f busy with other processes, %d other evomerge workers%s)",
             n, total, busy, len(others), f": pids {', '.join(map(str, others))}" if others else "")
    return n


def apply_threads(n: int) -> int:
    """Set torch's intra-op threads to `n`, and its inter-op threads too the first time (torch accepts that
    only once per process, before any inter-op work started; later calls leave it as it is)."""
    import torch

    global _interop_done
    n = _positive(n, "threads")
    if not _interop_done:
        _interop_done = True
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # already set, or inter-op work already ran in this process
            pass
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# -------------------------------------------------------------------------- the --threads flag
CLI_HELP = ("torch CPU threads (default: the space's `threads:`, else one per physical core not used by another "
            "evomerge worker on this host); sets EVOMERGE_THREADS")


def cli_count(text: str) -> int:
    """argparse `type` of --threads: a whole number >= 1."""
    import argparse

    try:
        return _positive(text, "--threads")
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None


def request_threads(n: int | None) -> None:
    """--threads N: every later `choose_threads` in this process (and its child processes) returns N."""
    if n is not None:
        os.environ[ENV] = str(_positive(n, "--threads"))


# -------------------------------------------------------------------------- cores
def _affinity() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(sys_cpu: Path = Path("/sys/devices/system/cpu"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Physical cores of the CPUs this process may run on, capped by its cgroup CPU quota; at least 1."""
    cpus = _affinity()
    pairs: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            pairs.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no topology (some containers, other systems): count logical CPUs
            pairs = {("cpu", str(c)) for c in cpus}
            break
    n = max(1, len(pairs))
    quota = cgroup_cpu_limit(cgroup)
    return max(1, min(n, quota)) if quota else n


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs a cgroup quota allows (rounded up), or None without a quota (cgroup v2 `cpu.max`, v1 `cfs_quota`)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):
        return None


def cpu_ticks(proc: Path, pid: int, cpus: list[int]) -> tuple[int, int, int] | None:
    """(busy ticks, all ticks) summed over `cpus` (lines cpuN of /proc/stat), and this process's ticks (all its
    threads); None when /proc/stat cannot be read."""
    busy = total = 0
    try:
        for line in (proc / "stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    except (OSError, ValueError):
        return None
    own = 0
    try:
        fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        pass
    return (busy, total, own) if total else None


def busy_elsewhere(proc: Path = Path("/proc"), pid: int | None = None, *, interval: float = 0.2,
                   sleep: Callable[[float], None] = time.sleep, cpus: list[int] | None = None) -> float:
    """CPUs (of `cpus`, default: this process's affinity) busy with other processes during `interval` seconds."""
    me = os.getpid() if pid is None else pid
    cpus = _affinity() if cpus is None else cpus
    before = cpu_ticks(proc, me, cpus)
    if before is None:
        return 0.0
    sleep(interval)
    after = cpu_ticks(proc, me, cpus)
    if after is None or after[1] <= before[1]:
        return 0.0
    busy = (after[0] - before[0]) - (after[2] - before[2])
    return max(0.0, busy / (after[1] - before[1]) * len(cpus))


# -------------------------------------------------------------------------- other workers
def is_worker_command(argv: list[str]) -> bool:
    """`[python] .../evomerge [--flags] CMD ...` or `python -m evomerge[.cli] [--flags] CMD ...` with CMD one
    that merges or scores models (an editor or `grep evomerge` is not a worker)."""
    for i, arg in enumerate(argv[:3]):
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] in ENTRY_MODULES:
            rest = argv[i + 2:]
            break
        if arg.startswith("-m") and arg[2:] in ENTRY_MODULES:
            rest = argv[i + 1:]
            break
        if not arg.startswith("-") and os.path.basename(arg) == "evomerge":
            rest = argv[i + 1:]
            break
    else:
        return False
    command = next((a for a in rest if not a.startswith("-")), None)
    return command in WORKER_COMMANDS


def _read_process(entry: Path) -> tuple[list[str], str, int] | None:
    """(argv, state, parent pid) of /proc/PID, or None when it is gone or unreadable."""
    try:
        raw = (entry / "cmdline").read_bytes()
    except OSError:
        return None
    argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0")]
    while argv and not argv[-1]:
        argv.pop()
    state, ppid = "?", 0
    try:
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        pass
    return argv, state, ppid


def _processes(proc: Path) -> dict[int, tuple[list[str], str, int]]:
    out = {}
    try:
        entries: Iterable[Path] = list(proc.iterdir())
    except OSError:
        return {}
    for entry in entries:
        if entry.name.isdigit():
            info = _read_process(entry)
            if info is not None:
                out[int(entry.name)] = info
    return out


def other_workers(proc: Path = Path("/proc"), pid: int | None = None) -> list[int]:
    """Pids of the other running evomerge workers on this host (not this process, its parents or children)."""
    me = os.getpid() if pid is None else pid
    table = _processes(proc)
    parent = {p: info[2] for p, info in table.items()}
    family = {me} | _ancestors(me, parent)
    children = {me}
    changed = True
    while changed:  # children, grandchildren, ...
        changed = False
        for p, pp in parent.items():
            if pp in children and p not in children:
                children.add(p)
                changed = True
    family |= children
    return sorted(p for p, (argv, state, _) in table.items()
                  if p not in family and state not in ("Z", "T", "t", "X") and is_worker_command(argv))


def _ancestors(pid: int, parent: dict[int, int]) -> set[int]:
    seen: set[int] = set()
    p = parent.get(pid, 0)
    while p and p not in seen:
        seen.add(p)
        p = parent.get(p, 0)
    return seen
