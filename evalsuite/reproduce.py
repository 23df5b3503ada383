"""`cli.py reproduce`: the paper's grid of runs in one command, idempotent and resumable.

The grid (grid.py) is experiments x variants x seeds. On a CPU every run trains in its own one-thread process,
side by side; on GPUs the seeds of one (experiment, variant) train as stacks (`train --seeds`, up to
`--stack_size` at once, each model exactly the run `--seed k` would make). Evaluations are separate `cli.py eval`
processes. The jobs run `--jobs` at a time here (launch_local.py) or as Slurm jobs (launch_slurm.py); a failed
job cannot take the others down, and a killed grid leaves each run's last checkpoint behind.
Run again with the same arguments, a grid skips finished runs, resumes interrupted ones and evaluates
trained ones, so nothing is lost and nothing is done twice. The aggregate (aggregate.py) comes at the end.
"""
from __future__ import annotations

from pathlib import Path

from evalsuite.aggregate import Run, aggregate_grid
from evalsuite.grid import Job, ReproduceConfig, RunState, check_runs, grid_runs, plan_jobs, prepare_stores
from evalsuite.launch_local import run_jobs
from pipeline.errors import UserError
from pipeline.shardio import exclusive


def reproduce(cfg: ReproduceConfig, say=print) -> dict | None:
    """Run the grid (what is not done yet), then aggregate it into OUT/results.{json,md,png}. With --launcher
    slurm and --no_wait, returns None once the jobs are submitted: the same command aggregates them later.
    One reproduce at a time per grid folder; a grid with a failed run ends in an error, after its aggregate."""
    with claim_grid(cfg.out):
        summary = run_grid(cfg, say)
    if summary is None:  # submitted, not waited for
        return None
    ours = set(grid_runs(cfg))
    failed = [run.name for run in (Run(r["experiment"], r["variant"], r["seed"]) for r in summary["runs"]
                                   if r["status"] == "failed") if run in ours]
    if failed:
        raise UserError(f"{len(failed)} run(s) of the grid failed: {', '.join(failed)} (see each run's "
                        "train.log or eval.log; the same command retries them)")
    return summary


def claim_grid(out: str):
    """Hold OUT/.reproduce.lock while the grid runs: a second reproduce on the same folder fails at once."""
    Path(out).mkdir(parents=True, exist_ok=True)
    lock_file = Path(out) / ".reproduce.lock"
    return exclusive(lock_file, f"another reproduce is running on {out} (it holds {lock_file}): wait for it to "
                                "end, or give another --out")


def run_grid(cfg: ReproduceConfig, say) -> dict | None:
    runs = grid_runs(cfg)
    states = check_runs(cfg, runs)
    todo = [r for r in runs if states[r].status != "done"]
    for run in runs:
        if states[run].status == "done":
            say(f"[skip] {run.name}: finished, evaluated")
    prepare_stores(cfg, [r for r in todo if states[r].status in ("new", "partial")], say)
    jobs = plan_jobs(cfg, todo, states)
    announce(jobs, states, say)
    if cfg.launcher == "slurm":
        from evalsuite.launch_slurm import launch  # here: it imports submitit
        interrupted = launch(cfg, jobs, say, total=len(runs), done=len(runs) - len(todo))
        if interrupted is None:
            return None
    else:
        interrupted = run_jobs(cfg, jobs, states, say, total=len(runs), done=len(runs) - len(todo))
    summary = aggregate_grid(cfg.out, runs, vars(cfg))
    say(f"aggregate: {Path(cfg.out) / summary['paths']['md']}")
    if interrupted:
        raise KeyboardInterrupt
    return summary


def announce(jobs: list[Job], states: dict[Run, RunState], say) -> None:
    for job in jobs:
        for run in job.runs:
            if states[run].status == "partial":
                say(f"[resume] {run.name}: from episode {states[run].episodes_done}")
        if job.stacked and len(job.runs) > 1:
            say(f"[stack] {job.name}: {len(job.runs)} seeds trained as one stack")

