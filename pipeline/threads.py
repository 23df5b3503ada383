"""One CPU thread policy for every command that runs torch: how many threads, and how idle ones wait.

Two settings, both read by the OpenMP runtime when torch loads, so `apply()` must run before `import torch`
(it still sets torch's thread count when torch is already loaded, but then the wait policy is fixed):

- threads: `--threads N`, else $OMP_NUM_THREADS, else every core this process may use (CPU affinity and a
  cgroup CPU quota both count). Exported as OMP_NUM_THREADS and MKL_NUM_THREADS, so child processes (the
  DataLoader workers, and the training jobs that `reproduce` starts with their own --threads) inherit it.
- waiting: idle OpenMP threads spin GOMP_SPINCOUNT=1000 rounds before they sleep, not libgomp's 300,000
  (libgomp's own choice when threads outnumber cores). On a shared CPU the long spin takes the cores from the
  threads doing the work: ME training beside one busy process ran 0.8 episodes/s with it and 16 without it
  (issue 8; docs/benchmarks.md has the measurements, from benchmarks/threads.py). Left alone when the user
  sets GOMP_SPINCOUNT or OMP_WAIT_POLICY.

This module never imports torch: the pipeline stage does not need it, and importing it here would be too
early for the settings above.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SPIN_VAR, WAIT_POLICY_VAR = "GOMP_SPINCOUNT", "OMP_WAIT_POLICY"
SHORT_SPINCOUNT = "1000"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")

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


def thread_env(threads: int | None = None, environ=os.environ) -> dict[str, str]:
    """The environment variables that carry the policy: for this process before torch loads, or a child's
    environment (e.g. the original code, run with our settings by benchmarks/compare.py)."""
    n = str(resolve_threads(threads, environ))
    env = {name: n for name in THREAD_VARS}
    if WAIT_POLICY_VAR not in environ:
        env[SPIN_VAR] = environ.get(SPIN_VAR, SHORT_SPINCOUNT)
    return env


def apply(threads: int | None = None) -> dict:
    """Set the policy for this process (and its children); returns what `applied()` returns."""
    env = thread_env(threads)
    os.environ.update(env)
    torch = sys.modules.get("torch")
    if torch is not None:  # too late for the wait policy, not for the thread count
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    _applied.clear()
    _applied.update(threads=int(env["OMP_NUM_THREADS"]), spincount=os.environ.get(SPIN_VAR),
                    wait_policy=os.environ.get(WAIT_POLICY_VAR), before_torch=torch is None)
    return applied()


def applied() -> dict:
    """What the last apply() set, for start summaries and reports: threads, spincount, wait_policy and
    before_torch (False: torch was loaded first, so the wait setting did not take effect). {} if none."""
    return dict(_applied)
