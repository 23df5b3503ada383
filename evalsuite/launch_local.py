"""The local launcher: a grid's jobs as processes on this machine, `--jobs` at a time."""
from __future__ import annotations

import signal
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from evalsuite.grid import Job, ReproduceConfig, report
from evalsuite.supervise import Supervisor


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def run_jobs(cfg: ReproduceConfig, jobs: list[Job], states: dict, say, total: int, done: int) -> bool:
    """Returns whether the grid was interrupted (Ctrl-C, or SIGTERM handled as Ctrl-C)."""
    grid = Supervisor(cfg, say)
    # SIGINT too, explicitly: a process started in the background by a shell (`cmd &`, nohup) inherits SIGINT
    # ignored, and Python then leaves it ignored, so `kill -INT` would not stop the grid.
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    pool = ThreadPoolExecutor(max_workers=cfg.jobs)
    try:
        futures = {pool.submit(grid.execute, job, states): job for job in jobs}
        pending = set(futures)
        while pending:
            try:
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in finished:
                    done = report(cfg, future.result(), say, total, done)
            except KeyboardInterrupt:
                if not grid.stopping.is_set():
                    say("interrupted: the running runs write a checkpoint; no new run starts")
                grid.interrupt()
    finally:
        pool.shutdown(wait=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return grid.stopping.is_set()
