"""One CPU thread policy for every command that runs torch: how many threads, and how idle ones wait.

Two settings, both read by the OpenMP runtime when torch loads, so `apply()` must run before `import torch`
(it still sets torch's thread count when torch is already loaded, but then the wait policy is fixed):

- threads: `--threads N`, else $OMP_NUM_THREADS, else (adaptive, below) the cores this process may use
  (CPU affinity and a cgroup CPU quota both count) that other processes leave free. Exported as
  OMP_NUM_THREADS and MKL_NUM_THREADS, so child processes (the DataLoader workers, and the training jobs
  that `reproduce` starts with their own --threads) inherit it.
- waiting: idle OpenMP threads spin GOMP_SPINCOUNT=1000 rounds before they sleep, not libgomp's 300,000.
  On a shared CPU the long spin takes the cores from the threads doing the work (docs/benchmarks.md has the
  measurements, from benchmarks/threads.py). Left alone when the user sets GOMP_SPINCOUNT or OMP_WAIT_POLICY.

When the user sets none of these, the policy adapts to the load (`adaptive`): it samples /proc/stat for a
quarter of a second and counts the cores that other processes keep busy. On a quiet machine it takes every
core with libgomp's long spin (the fastest setting there: it keeps the second thread hot between the many
small LSTM-step products); beside busy processes it takes the cores they leave free, at least one, with the
short spin (the fastest setting there). A training run keeps its thread count from start to end, since the
count changes how its products round: a resumed run takes the count it was trained with (`keep_for_run`),
so it is bitwise its uninterrupted twin, and the policy adapts only between runs.

This module never imports torch: the pipeline stage does not need it, and importing it here would be too
early for the settings above.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SPIN_VAR, WAIT_POLICY_VAR = "GOMP_SPINCOUNT", "OMP_WAIT_POLICY"
SHORT_SPINCOUNT = "1000"
LONG_SPINCOUNT = "300000"   # libgomp's own default; exported, so child processes keep the choice
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
PROC_STAT = Path("/proc/stat")
LOAD_SAMPLE_SECONDS = 0.25
BUSY_CORE = 0.5             # other processes using at least half a core take that core

_applied: dict = {}


def cgroup_cpu_limit(cpu_max_text: str) -> int | None:
    """Whole CPUs allowed by a cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD"); None when unlimited."""
    fields = cpu_max_text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return max(1, quota // period) if period > 0 else None


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup quota (containers, clusters)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        limit = cgroup_cpu_limit(CGROUP_CPU_MAX.read_text())
    except OSError:
        limit = None
    return min(cores, limit) if limit else cores


def resolve_threads(threads: int | None, environ=os.environ) -> int:
    """--threads, else a valid $OMP_NUM_THREADS, else usable_cores()."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        return threads
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return int(given)
    return usable_cores()


def is_adaptive(threads: int | None, environ=os.environ) -> bool:
    """True when neither --threads nor any OMP variable the policy sets was given: the load decides."""
    given = environ.get("OMP_NUM_THREADS", "").strip()
    return (threads is None and not (given.isdigit() and int(given) >= 1)
            and SPIN_VAR not in environ and WAIT_POLICY_VAR not in environ)


def thread_env(threads: int | None = None, environ=os.environ, others_busy: float = 0.0) -> dict[str, str]:
    """The environment variables that carry the policy: for this process before torch loads, or a child's
    environment (e.g. the original code, run with our settings by benchmarks/compare.py). `others_busy`, the
    cores other processes keep busy, counts only for the adaptive policy."""
    if is_adaptive(threads, environ):
        cores = usable_cores()
        n = free_cores(cores, others_busy, len(_cpus()))
        spin = LONG_SPINCOUNT if others_busy < BUSY_CORE else SHORT_SPINCOUNT
        return {**{name: str(n) for name in THREAD_VARS}, SPIN_VAR: spin}
    n = str(resolve_threads(threads, environ))
    env = {name: n for name in THREAD_VARS}
    if WAIT_POLICY_VAR not in environ:
        env[SPIN_VAR] = environ.get(SPIN_VAR, SHORT_SPINCOUNT)
    return env


def apply(threads: int | None = None) -> dict:
    """Set the policy for this process (and its children); returns what `applied()` returns."""
    adaptive = is_adaptive(threads)
    others = others_busy_cores(LOAD_SAMPLE_SECONDS) if adaptive else None
    env = thread_env(threads, others_busy=others or 0.0)
    os.environ.update(env)
    torch = sys.modules.get("torch")
    if torch is not None:  # too late for the wait policy, not for the thread count
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    _applied.clear()
    _applied.update(threads=int(env["OMP_NUM_THREADS"]), spincount=os.environ.get(SPIN_VAR),
                    wait_policy=os.environ.get(WAIT_POLICY_VAR), before_torch=torch is None,
                    adaptive=adaptive, others_busy=None if others is None else round(others, 2))
    return applied()


def applied() -> dict:
    """What the last apply() set, for start summaries and reports: threads, spincount, wait_policy,
    before_torch (False: torch was loaded first, so the wait setting did not take effect), adaptive and
    others_busy (the cores other processes kept busy when it was measured). {} if none."""
    return dict(_applied)


# ---- the load of the other processes -----------------------------------------------------------------------

def busy_and_total_ticks(stat_text: str, cpus: set[int]) -> tuple[int, int]:
    """Clock ticks summed over `cpus` from /proc/stat's per-CPU lines: (busy, total); idle and iowait are
    not busy."""
    busy = total = 0
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def _cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return set(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class LoadSample:
    busy_ticks: int         # over this process's CPUs, every process
    own_seconds: float      # this process's CPU time, all its threads
    wall: float


def load_sample(cpus: set[int]) -> LoadSample | None:
    """None where /proc/stat cannot be read (not Linux): the policy then assumes a quiet machine."""
    try:
        busy, _ = busy_and_total_ticks(PROC_STAT.read_text(), cpus)
    except OSError:
        return None
    return LoadSample(busy, time.process_time(), time.monotonic())


def others_between(first: LoadSample, second: LoadSample, cores: int) -> float:
    """Cores kept busy by every process but this one between two samples (0 to `cores`)."""
    wall = second.wall - first.wall
    if wall <= 0:
        return 0.0
    busy = (second.busy_ticks - first.busy_ticks) / os.sysconf("SC_CLK_TCK")
    return min(float(cores), max(0.0, (busy - (second.own_seconds - first.own_seconds)) / wall))


def others_busy_cores(seconds: float) -> float | None:
    """Cores other processes keep busy, measured over `seconds` (this process sleeps meanwhile)."""
    cpus = _cpus()
    first = load_sample(cpus)
    time.sleep(seconds)
    second = load_sample(cpus)
    return None if first is None or second is None else others_between(first, second, len(cpus))


def free_cores(cores: int, others_busy: float, cpus: int | None = None) -> int:
    """The cores left to this process, at least one: of the `cpus` it may run on, those that others keep less
    than half busy, up to `cores` (its usable cores: fewer than `cpus` under a cgroup quota, where the other
    processes on the CPUs are not competing for our quota)."""
    cpus = cpus or cores
    return max(1, min(cores, cpus - int(others_busy + BUSY_CORE)))


def keep_for_run(trained_with: int | None, set_threads) -> int:
    """The thread count for a resumed run: under the adaptive policy, the count it was trained with (its
    checkpoint's), so that its products round as before; a count the user fixed stays. Returns the count."""
    if _applied.get("adaptive") and trained_with:
        set_threads(trained_with)
        _applied.update(threads=trained_with, kept_from_checkpoint=True)
    return _applied.get("threads", trained_with or usable_cores())
