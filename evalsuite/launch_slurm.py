"""`reproduce --launcher slurm`: each job of the grid (a stack of seeds, or one run) is one Slurm job, and the
grid's jobs go in as one job array, through submitit.

On the node, GridJob runs the job's steps as `--launcher local` does (the same `cli.py train` / `cli.py eval`
command lines, logs and run.json records), from where its runs stand on disk. It follows submitit's
checkpointing protocol: on pre-emption or the time limit (submitit's signal, USR2 by default, or SIGUSR1 or
SIGTERM), the running `train` gets SIGINT, writes its checkpoint and exits, and `checkpoint()` hands submitit
the same job to requeue; the grid being idempotent, the requeued job resumes from that checkpoint.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import submitit
from submitit.core.job_environment import JobEnvironment
from submitit.helpers import Checkpointable, DelayedSubmission

from pipeline.shardio import write_bytes_atomically
from evalsuite.aggregate import Run
from evalsuite.commands import importable_path
from evalsuite.grid import Job, ReproduceConfig, RunRecord, check_runs, plan_jobs, report
from evalsuite.supervise import Supervisor

POLL_S = {"local": 1.0, "slurm": 15.0}  # how often the waiting `reproduce` looks at the jobs
SUBMITTED = "submitted.json"  # in the submitit folder: {job name: job id} of every job this grid submitted
SLURM_LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED",
                     "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}  # sacct's; a job it no longer knows
# is taken for ended


class GridJob(Checkpointable):
    """What one Slurm job runs: train the job's runs if they need it, then evaluate them."""

    def __init__(self, cfg: ReproduceConfig, job: Job):
        self.cfg, self.job = cfg, job
        self._grid: Supervisor | None = None
        self._worker: threading.Thread | None = None

    def __getstate__(self) -> dict:  # what submitit pickles: the job, not a running one's threads
        return {"cfg": self.cfg, "job": self.job, "_grid": None, "_worker": None}

    def __call__(self) -> dict[Run, RunRecord]:
        """The steps run in a thread: signals reach the main thread, which waits here."""
        self._grid = Supervisor(self.cfg, say=lambda line: print(line, flush=True), own_sessions=False)
        outcome: dict = {}
        self._worker = threading.Thread(target=_capture, args=(outcome, run_job, self._grid, self.job))
        forward_preemption()
        self._worker.start()
        while self._worker.is_alive():
            self._worker.join(0.5)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Called by submitit on pre-emption: the running train checkpoints and exits (130), then the same job is
        requeued; it resumes from the checkpoint."""
        if self._grid is not None and self._worker is not None:
            if not self._grid.stopping.is_set():
                print("pre-empted: the running train writes a checkpoint; the job is requeued", flush=True)
                self._grid.interrupt()
            self._worker.join()
        return DelayedSubmission(self)


def _capture(outcome: dict, function, *args) -> None:
    try:
        outcome["result"] = function(*args)
    except BaseException as err:  # noqa: BLE001 -- re-raised in the main thread
        outcome["error"] = err


def run_job(grid: Supervisor, job: Job) -> dict[Run, RunRecord]:
    """The job's runs from where they stand on disk: a requeued job skips what it finished and resumes the rest."""
    cfg = grid.cfg
    states = check_runs(cfg, list(job.runs))
    records = {run: RunRecord.load(cfg, run) for run in job.runs if states[run].status == "done"}
    for part in plan_jobs(cfg, [run for run in job.runs if states[run].status != "done"], states):
        for run in part.runs:
            if states[run].status == "partial":
                grid.say(f"[resume] {run.name}: from episode {states[run].episodes_done}")
        records |= grid.execute(part, states)
    return {run: records[run] for run in job.runs}


def forward_preemption() -> None:
    """SIGTERM (Slurm's pre-emption and time limit) and SIGUSR1 do what submitit's own signal does: checkpoint
    and requeue. submitit installed that handler before calling the job."""
    requeue = signal.getsignal(JobEnvironment._usr_sig())
    if callable(requeue):
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, requeue)


def make_executor(cfg: ReproduceConfig) -> submitit.AutoExecutor:
    # The job unpickles GridJob on the node: the repository must be importable there, wherever it runs from.
    os.environ["PYTHONPATH"] = importable_path()
    executor = submitit.AutoExecutor(folder=cfg.slurm_path, cluster=cfg.slurm_cluster)
    executor.update_parameters(
        name="metaseq2seq", timeout_min=cfg.time, gpus_per_node=cfg.gpus_per_job, cpus_per_task=cfg.cpus_per_job,
        slurm_partition=cfg.partition, slurm_additional_parameters=cfg.slurm_parameters() or None)
    return executor


def submit(cfg: ReproduceConfig, jobs: list[Job]) -> list[submitit.Job]:
    """The grid's jobs as one job array; their ids go to SUBMITTED, for a later `reproduce` of the same grid."""
    if not jobs:
        return []
    executor = make_executor(cfg)
    with executor.batch():
        submitted = [executor.submit(GridJob(cfg, job)) for job in jobs]
    ids = submitted_ids(cfg) | {job.name: handle.job_id for job, handle in zip(jobs, submitted)}
    write_bytes_atomically(cfg.slurm_path / SUBMITTED, json.dumps(ids, indent=1).encode())
    return submitted


def submitted_ids(cfg: ReproduceConfig) -> dict[str, str]:
    path = cfg.slurm_path / SUBMITTED
    return json.loads(path.read_text()) if path.is_file() else {}


def job_alive(cfg: ReproduceConfig, job_id: str) -> bool:
    """Whether a job that an earlier `reproduce` submitted is still queued or running. Slurm says so (sacct, through
    submitit); submitit's local executor names a job by its process id."""
    if cfg.slurm_cluster == "local":
        try:  # a live process of that id that runs submitit (not another one that took the id later)
            alive = b"submitit" in Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
        except (OSError, ValueError):
            return False
        return alive and not submitit.LocalJob(cfg.slurm_path, job_id).paths.result_pickle.exists()
    info = submitit.SlurmJob(cfg.slurm_path, job_id).get_info(mode="force")
    return info.get("State", "UNKNOWN").split(" ")[0] in SLURM_LIVE_STATES


class QueuedJob:
    """A job of an earlier `reproduce` that still runs: not submitted again, waited for by its id, and read from
    what its runs wrote when it ends."""

    def __init__(self, cfg: ReproduceConfig, job: Job, job_id: str):
        self.cfg, self.job, self.job_id = cfg, job, job_id

    def done(self) -> bool:
        return not job_alive(self.cfg, self.job_id)

    def result(self) -> dict[Run, RunRecord]:
        records = {run: RunRecord.load(self.cfg, run) for run in self.job.runs}
        unfinished = [run.name for run, record in records.items() if record.status != "done"]
        if unfinished:
            raise RuntimeError(f"it ended with {', '.join(unfinished)} not done")
        return records


def still_queued(cfg: ReproduceConfig, jobs: list[Job]) -> dict[Job, QueuedJob]:
    ids = submitted_ids(cfg)
    return {job: QueuedJob(cfg, job, ids[job.name]) for job in jobs
            if job.name in ids and job_alive(cfg, ids[job.name])}


def launch(cfg: ReproduceConfig, jobs: list[Job], say, total: int, done: int) -> bool | None:
    """Submit the jobs; then wait for them, a progress line per finished run, and return whether the wait was
    interrupted; or, with --no_wait, return None at once."""
    if not jobs:
        return False
    cfg = replace(cfg, out=str(Path(cfg.out).resolve()))  # the jobs may start anywhere
    queued = still_queued(cfg, jobs)
    for job, handle in queued.items():
        say(f"[queued] {job.name}: job {handle.job_id} of an earlier call is still queued or running; "
            "not submitted again")
    new = [job for job in jobs if job not in queued]
    submitted = submit(cfg, new)
    for job, handle in zip(new, submitted):
        say(f"[submitted] {job.name}: job {handle.job_id}")
    say(f"submitit logs: {cfg.slurm_path}")
    if cfg.no_wait:
        say(f"when the jobs end, run the same command again to aggregate them: {rerun_command()}")
        return None
    try:
        wait_for(cfg, queued | dict(zip(new, submitted)), say, total, done)
    except KeyboardInterrupt:
        say(f"interrupted: the jobs keep running (scancel stops them); when they end, run {rerun_command()}")
        return True
    return False


def wait_for(cfg: ReproduceConfig, pending: dict[Job, submitit.Job | QueuedJob], say, total: int, done: int) -> None:
    while pending:
        for job in [job for job, handle in pending.items() if handle.done()]:
            done = report(cfg, job_records(cfg, job, pending.pop(job)), say, total, done)
        if pending:
            time.sleep(POLL_S[cfg.slurm_cluster])


def job_records(cfg: ReproduceConfig, job: Job, handle: submitit.Job | QueuedJob) -> dict[Run, RunRecord]:
    """What a finished job returned; for a job that died, what its runs wrote and why it ended."""
    try:
        return handle.result()
    except Exception as err:  # noqa: BLE001 -- a failed job is reported, it does not stop the others
        why = [line for line in str(err).splitlines() if line.strip()]
        records = {run: RunRecord.load(cfg, run) for run in job.runs}
        for run, record in records.items():
            if record.status != "done":
                record.status = "failed"
                record.error = f"job {handle.job_id} failed: {why[-1][:300] if why else type(err).__name__}"
                record.save(cfg, run)
        return records


def rerun_command() -> str:
    return shlex.join(["python", *[arg for arg in sys.argv if arg != "--no_wait"]])
