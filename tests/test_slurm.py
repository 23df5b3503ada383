"""`cli.py reproduce --launcher slurm` through a real submitit executor: submitit's local one
(METASEQ2SEQ_SUBMITIT_CLUSTER=local) runs each Slurm job as processes on this machine, with submitit's pickling,
job arrays, signals and requeueing."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evalsuite.aggregate import Run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--experiments", "ME", "--seeds", "0,1", "--num_episodes", "48", "--emb_size", "16", "--nlayers", "1",
        "--batch_size", "8", "--threads", "1", "--stacked"]  # stacks, as a GPU cluster's default
LONG = ["--experiments", "ME", "--seeds", "0", "--num_episodes", "800", "--emb_size", "16", "--nlayers", "1",
        "--threads", "1", "--val_every", "40", "--checkpoint_every", "40", "--num_val_episodes", "2"]
SLURM = ["--launcher", "slurm", "--time", "30"]


def command(out: Path, *args: str) -> list[str]:
    return [sys.executable, "cli.py", "reproduce", "--out", str(out), *args]


def environment(cluster: str | None = "local") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("METASEQ2SEQ_SUBMITIT_CLUSTER", None)
    return env | ({"METASEQ2SEQ_SUBMITIT_CLUSTER": cluster} if cluster else {})


def reproduce(out: Path, *args: str, cluster: str | None = "local") -> subprocess.CompletedProcess:
    return subprocess.run(command(out, *args), cwd=ROOT, env=environment(cluster), capture_output=True, text=True,
                          timeout=600)


def per_run(out: Path) -> dict:
    """results.json's runs without timings and paths, and each run's training losses."""
    runs = {}
    for run in json.loads((out / "results.json").read_text())["runs"]:
        name = Run(run["experiment"], run["variant"], run["seed"])
        losses = [json.loads(line)["loss"] for line in open(name.dir(out) / "net_ME.metrics.jsonl")]
        runs[name] = {key: run[key] for key in ("status", "error", "metrics", "episodes", "trained_on")}
        runs[name]["losses"] = losses
    return runs


@pytest.mark.slow
def test_a_grid_through_submitit_equals_the_local_grid(tmp_path):
    local = reproduce(tmp_path / "local", *TINY)
    slurm = reproduce(tmp_path / "slurm", *TINY, *SLURM)
    assert local.returncode == 0 and slurm.returncode == 0, local.stderr + slurm.stderr + slurm.stdout
    assert per_run(tmp_path / "local") == per_run(tmp_path / "slurm")
    assert len(per_run(tmp_path / "slurm")) == 2
    assert re.search(r"\[submitted\] ME/full/seeds0,1: job \d+", slurm.stdout)
    assert slurm.stdout.count("done (train") == 2  # a progress line per run, as locally
    assert list((tmp_path / "slurm" / "slurm").glob("*_log.out"))  # submitit's logs in OUT/slurm
    again = reproduce(tmp_path / "slurm", *TINY, *SLURM)
    assert again.returncode == 0 and again.stdout.count("[skip]") == 2 and "[submitted]" not in again.stdout


def wait_for_checkpoint(run: Run, out: Path, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + 300
    while not run.checkpoint(out).is_file() and time.time() < deadline:
        assert process is None or process.poll() is None, process.communicate()
        time.sleep(0.05)
    assert run.checkpoint(out).is_file()


def job_processes(folder: Path) -> list[int]:
    """The processes that run submitit jobs of `folder` (python -m submitit.core._submit FOLDER)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"submitit.core._submit" in words and str(folder).encode() in words:
            pids.append(int(entry.name))
    return pids


def assert_trained_once(run: Run, out: Path, num_episodes: int = 800) -> None:
    assert torch.load(run.checkpoint(out), weights_only=True)["episodes_done"] == num_episodes
    episodes = [json.loads(line)["episodes"] for line in open(run.dir(out) / "net_ME.metrics.jsonl")]
    assert episodes == list(range(40, num_episodes + 1, 40))  # increasing: no episode trained twice
    assert json.loads((run.dir(out) / "run.json").read_text())["status"] == "done"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_preempted_job_checkpoints_and_is_requeued(tmp_path, signum):
    """Pre-emption: the job's train checkpoints, submitit requeues the job, and it resumes from the checkpoint."""
    run = Run("ME", "full", 0)
    grid = subprocess.Popen(command(tmp_path, *LONG, *SLURM), cwd=ROOT, env=environment(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_checkpoint(run, tmp_path, grid)
    [job] = job_processes((tmp_path / "slurm").resolve())
    os.kill(job, signum)
    stdout, stderr = grid.communicate(timeout=600)
    assert grid.returncode == 0, stderr + stdout
    assert "[1/1] ME/full/seed0: done (train" in stdout
    assert_trained_once(run, tmp_path)
    trains = [a for a in json.loads((run.dir(tmp_path) / "run.json").read_text())["attempts"] if a["step"] == "train"]
    assert [a["exit_code"] for a in trains] == [130, 0]  # checkpointed on the signal, then resumed
    logs = "".join(p.read_text() for p in (tmp_path / "slurm").glob("*_log.*"))
    assert "Requeued job" in logs and "[resume] ME/full/seed0: from episode" in logs


@pytest.mark.slow
def test_a_killed_job_is_resumed_by_the_same_command(tmp_path):
    """--no_wait submits and returns; the job is killed (its whole process group, train included) after its
    first checkpoint; the same command then resumes the run from that checkpoint and aggregates."""
    run = Run("ME", "full", 0)
    # Output to a file: the local executor's job (unlike an sbatch one) inherits it, and a pipe stays open.
    with open(tmp_path / "submit.log", "w+") as log:
        submitted = subprocess.run(command(tmp_path, *LONG, *SLURM, "--no_wait"), cwd=ROOT, env=environment(),
                                   stdout=log, stderr=subprocess.STDOUT, timeout=300, start_new_session=True)
        log.seek(0)
        output = log.read()
    assert submitted.returncode == 0, output
    assert "[submitted] ME/full/seed0: job" in output and "run the same command again" in output
    assert "--no_wait" not in output.splitlines()[-1] and not (tmp_path / "results.json").exists()
    wait_for_checkpoint(run, tmp_path)
    [job] = job_processes((tmp_path / "slurm").resolve())
    os.killpg(os.getpgid(job), signal.SIGKILL)
    while job_processes((tmp_path / "slurm").resolve()):
        time.sleep(0.05)
    stopped = torch.load(run.checkpoint(tmp_path), weights_only=True)["episodes_done"]
    assert 0 < stopped < 800, "the run finished before the kill: make it longer"
    again = reproduce(tmp_path, *LONG, *SLURM)
    assert again.returncode == 0, again.stderr + again.stdout
    assert f"[resume] ME/full/seed0: from episode {stopped}" in again.stdout
    assert_trained_once(run, tmp_path)
    assert (tmp_path / "results.json").is_file()
    record = json.loads((run.dir(tmp_path) / "run.json").read_text())
    trains = [a for a in record["attempts"] if a["step"] == "train"]
    assert [(a.get("cut_off", False), a["exit_code"]) for a in trains] == [(True, None), (False, 0)]
    assert trains[0]["seconds"] > 0 and record["train_seconds"] == pytest.approx(sum(a["seconds"] for a in trains))


@pytest.mark.parametrize("args, cluster, message", [
    (["--partition", "gpu"], "local", "--partition is an option of --launcher slurm"),
    pytest.param(["--launcher", "slurm", "--time", "0"], "local", "--time and --cpus_per_job must be at least 1",
                 marks=pytest.mark.slow),
    pytest.param(["--launcher", "slurm", "--gpus_per_job", "-1"], "local", "--gpus_per_job at least 0", marks=pytest.mark.slow),
    pytest.param(["--launcher", "slurm", "--slurm_extra", "constraint"], "local", "--slurm_extra takes KEY=VALUE",
                 marks=pytest.mark.slow),
    (["--launcher", "slurm"], None, "sbatch, which is not on the PATH"),
])
def test_bad_slurm_options_are_one_line_before_any_work(tmp_path, args, cluster, message):
    if cluster is None and shutil.which("sbatch"):
        pytest.skip("this machine has sbatch")
    out = tmp_path / "runs"
    result = reproduce(out, "--experiments", "ME", *args, cluster=cluster)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not out.exists()


def test_the_slurm_options_reach_the_sbatch_script(tmp_path, monkeypatch):
    """What sbatch would get (no cluster here: stand-ins for srun and sbatch only let submitit's Slurm executor
    be built; nothing is submitted)."""
    from evalsuite.grid import ReproduceConfig
    from evalsuite.launch_slurm import make_executor
    for name in ("srun", "sbatch"):
        (tmp_path / name).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("METASEQ2SEQ_SUBMITIT_CLUSTER", "slurm")
    cfg = ReproduceConfig(experiments=("ME",), out=str(tmp_path / "runs"), launcher="slurm", partition="gpu",
                          time=120, gpus_per_job=1, cpus_per_job=4, slurm_extra=("constraint=volta32gb", "qos=low"))
    script = make_executor(cfg)._executor._make_submission_file_text("CMD", "uid")
    for line in ("--partition=gpu", "--time=120", "--gpus-per-node=1", "--cpus-per-task=4",
                 "--constraint=volta32gb", "--qos=low", "--signal=USR2@90", f"--output={tmp_path}/runs/slurm/"):
        assert f"#SBATCH {line}" in script, line
    assert cfg.threads_per_job == 4  # a job's threads: its CPUs


@pytest.mark.slow
def test_a_rerun_while_the_job_runs_does_not_submit_it_again(tmp_path):
    """The same --no_wait command while its job still runs names the job and submits nothing; the same command
    without --no_wait then waits for that job and aggregates."""
    run, longer = Run("ME", "full", 0), [*LONG, "--num_episodes", "4000"]  # still running at the rerun
    with open(tmp_path / "submit.log", "w+") as log:  # a file, not a pipe: see the test above
        first = subprocess.run(command(tmp_path, *longer, *SLURM, "--no_wait"), cwd=ROOT, env=environment(),
                               stdout=log, stderr=subprocess.STDOUT, timeout=300, start_new_session=True)
    assert first.returncode == 0
    [job_id] = json.loads((tmp_path / "slurm" / "submitted.json").read_text()).values()
    wait_for_checkpoint(run, tmp_path)
    again = reproduce(tmp_path, *longer, *SLURM, "--no_wait")
    assert again.returncode == 0, again.stderr + again.stdout
    assert f"[queued] ME/full/seed0: job {job_id} of an earlier call is still queued or running" in again.stdout
    assert "[submitted]" not in again.stdout
    assert len(job_processes((tmp_path / "slurm").resolve())) == 1  # the one job, not a second
    waited = reproduce(tmp_path, *longer, *SLURM)
    assert waited.returncode == 0, waited.stderr + waited.stdout
    assert "[submitted]" not in waited.stdout and "[1/1] ME/full/seed0: done (" in waited.stdout
    assert_trained_once(run, tmp_path, 4000)
    assert (tmp_path / "results.json").is_file()
