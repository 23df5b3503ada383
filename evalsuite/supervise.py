"""Runs a job of the grid on this machine: its train and eval steps as `cli.py` child processes, each attempt
on the runs' records; both launchers (local and Slurm) use it."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from evalsuite.aggregate import Run
from evalsuite.commands import eval_command, importable_path, train_command
from evalsuite.grid import TIME_FORMAT, Job, ReproduceConfig, RunRecord, RunState

EXIT_INTERRUPTED = 130


class Supervisor:
    """Runs the jobs, `jobs` at a time; on Ctrl-C or SIGTERM it stops starting them and lets the running ones
    checkpoint (they get SIGINT), then exits 130. `own_sessions`: each step in a session of its own, out of
    reach of the terminal's Ctrl-C (the grid forwards it); a Slurm job keeps them in its own process group."""

    def __init__(self, cfg: ReproduceConfig, say, own_sessions: bool = True):
        self.cfg, self.say, self.own_sessions = cfg, say, own_sessions
        self.stopping = threading.Event()
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def step(self, records: dict[Run, "RunRecord"], name: str, command: list[str], log_path: Path) -> int:
        """Run one `cli.py` subprocess, its output appended to `log_path`; the attempt goes into every record."""
        start = time.time()
        attempt = self.open_attempt(records, name, start, log_path)
        code = self.run_child(command, log_path)
        seconds = time.time() - start
        attempt |= {"seconds": round(seconds, 1), "exit_code": code}  # the dict that every record holds
        for record in records.values():
            record.count_time(name, seconds)
        return code

    def open_attempt(self, records: dict[Run, "RunRecord"], name: str, start: float, log_path: Path) -> dict:
        """The attempt goes on record before it runs, so that one cut off by a hard kill is known later."""
        attempt = {"step": name, "started": time.strftime(TIME_FORMAT, time.localtime(start)),
                   "seconds": None, "exit_code": None, "log": str(log_path.relative_to(self.cfg.out))}
        if len(records) > 1:  # a stack: every model trained for the whole of this time
            attempt["stack"] = [run.seed for run in records]
        for record in records.values():
            record.attempts.append(attempt)
        self.saved(records)
        return attempt

    def run_child(self, command: list[str], log_path: Path) -> int:
        """The step runs where reproduce was started (the grid's paths are relative to it), importing this copy
        of the project."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": importable_path()}
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=self.own_sessions)
            with self.lock:
                self.children.add(child)
            code = child.wait()
            with self.lock:
                self.children.discard(child)
        return code

    def execute(self, job: Job, states: dict[Run, RunState]) -> dict[Run, "RunRecord"]:
        records = {run: RunRecord.load(self.cfg, run) for run in job.runs}
        for run, record in records.items():
            run.dir(self.cfg.out).mkdir(parents=True, exist_ok=True)
            record.error = None
        first = job.runs[0]
        if states[first].status in ("new", "partial"):
            resume = states[first].status == "partial"
            command = train_command(self.cfg, job.runs, resume)
            if job.stacked:
                log = first.dir(self.cfg.out).parent / f"train-seeds{'_'.join(str(r.seed) for r in job.runs)}.log"
            else:
                log = first.dir(self.cfg.out) / "train.log"
            if not self.run_step(records, "train", command, log):
                return self.saved(records)
        for run, record in records.items():
            if self.run_step({run: record}, "eval", eval_command(self.cfg, run), run.dir(self.cfg.out) / "eval.log"):
                record.status = "done"
        return self.saved(records)

    def run_step(self, records: dict[Run, "RunRecord"], name: str, command: list[str], log: Path) -> bool:
        """Whether the step succeeded; if not, why goes into every record."""
        if self.stopping.is_set():
            for record in records.values():
                record.status = "interrupted"
            return False
        code = self.step(records, name, command, log)
        if code == 0:
            return True
        interrupted = code == EXIT_INTERRUPTED or self.stopping.is_set()
        for record in records.values():
            record.status = "interrupted" if interrupted else "failed"
            record.error = None if interrupted else f"{name} exited {code}: {last_line(log)}"
        return False

    def saved(self, records: dict[Run, "RunRecord"]) -> dict[Run, "RunRecord"]:
        for run, record in records.items():
            record.save(self.cfg, run)
        return records

    def interrupt(self) -> None:
        self.stopping.set()
        with self.lock:
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)  # train checkpoints at the end of its step and exits 130


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return lines[-1][:300] if lines else "no output"
