"""`cli.py reproduce`: a tiny grid end to end, idempotence, kill and resume, the aggregate, bad grids."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evalsuite.aggregate import aggregate_grid
from evalsuite.aggregate import Run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--num_episodes", "48", "--emb_size", "16", "--nlayers", "1", "--batch_size", "8", "--threads", "1"]


def reproduce(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "reproduce", "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    result = reproduce(out, "--experiments", "ME,scan_around_right", "--seeds", "0,1", "--stacked", *TINY)
    assert result.returncode == 0, result.stderr + result.stdout
    return out, result


@pytest.mark.slow
def test_a_tiny_grid_writes_every_file(tiny_grid):
    out, result = tiny_grid
    for experiment in ("ME", "scan_around_right"):
        for seed in (0, 1):
            run = Run(experiment, "full", seed)
            folder = run.dir(out)
            for name in (f"net_{experiment}.pt", f"net_{experiment}.metrics.jsonl", f"net_{experiment}.curve.png",
                         "run.json", "eval.log", "eval/results.json", "eval/predictions_validation.jsonl"):
                assert (folder / name).is_file(), folder / name
            assert (folder.parent / "train-seeds0_1.log").is_file()  # the two seeds trained as one stack
            assert json.loads((folder / "run.json").read_text())["attempts"][0]["stack"] == [0, 1]
            assert json.loads((folder / "run.json").read_text())["status"] == "done"
            ckpt = torch.load(run.checkpoint(out), weights_only=True)
            assert ckpt["train_config"]["seed"] == seed and ckpt["episodes_done"] == 48
            assert Path(ckpt["store"]) == out / "stores" / f"seed{seed}" / experiment  # its own store per seed
    assert (out / "scan_around_right/full/seed0/eval/predictions_template_around_right.jsonl").is_file()
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    assert result.stdout.count("done (train") == 4  # a progress line per finished run
    assert result.stdout.count("[stack]") == 2
    table = (out / "results.md").read_text()
    assert "| ME | full |" in table and "| scan_around_right | full |" in table and "(n=2)" in table
    assert "Trained on: cpu (" in table and "(4 runs)" in table  # where the runs trained, not only aggregated


@pytest.mark.slow
def test_the_seeds_differ_in_store_init_and_order(tiny_grid):
    out, _ = tiny_grid
    manifests = [json.loads((out / "stores" / f"seed{s}" / "ME" / "manifest.json").read_text()) for s in (0, 1)]
    assert manifests[0]["shards"][0]["sha256"] != manifests[1]["shards"][0]["sha256"]
    weights = [torch.load(Run("ME", "full", s).checkpoint(out), weights_only=True)["model"] for s in (0, 1)]
    assert not torch.equal(weights[0]["out.weight"], weights[1]["out.weight"])


@pytest.mark.slow
def test_running_the_same_grid_again_skips_every_run(tiny_grid):
    out, _ = tiny_grid
    checkpoints = sorted(out.glob("*/full/seed*/net_*.pt"))
    before = [p.stat().st_mtime_ns for p in checkpoints]
    again = reproduce(out, "--experiments", "ME,scan_around_right", "--seeds", "0,1", "--stacked", *TINY)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("[skip]") == 4 and "done (train" not in again.stdout
    assert [p.stat().st_mtime_ns for p in checkpoints] == before


@pytest.mark.slow
def test_a_grid_with_other_settings_in_the_same_folder_is_refused(tiny_grid):
    out, _ = tiny_grid
    result = reproduce(out, "--experiments", "ME", "--seeds", "0", *TINY[:-4], "--batch_size", "4", "--threads", "1")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "batch_size=8" in result.stderr and "another --out" in result.stderr


def write_fake_run(out: Path, run: Run, status: str, splits: dict) -> None:
    folder = run.dir(out)
    (folder / "eval").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": status, "train_seconds": 60.0 * (run.seed + 1),
                                                 "eval_seconds": 1.0, "error": None}))
    (folder / "eval" / "results.json").write_text(json.dumps(
        {"checkpoint": {"episodes_done": 100}, "splits": splits}))


def test_the_aggregate_equals_a_hand_computation(tmp_path):
    jump = {0: 99.5, 1: 98.25, 2: 100.0}
    runs = [Run("scan_prim_permutation", "full", seed) for seed in jump] + [Run("ME", "full", 0), Run("ME", "full", 1)]
    for run in runs[:3]:
        write_fake_run(tmp_path, run, "done", {
            "validation": {"generalization": 90.0 + run.seed, "retrieval": 100.0},
            "addprim_jump": {"accuracy": jump[run.seed]}})
    write_fake_run(tmp_path, runs[3], "done", {"validation": {"generalization": 100.0, "retrieval": 100.0}})
    write_fake_run(tmp_path, runs[4], "failed", {})
    summary = aggregate_grid(tmp_path, runs, {"seeds": [0, 1, 2]})

    me, perm = summary["groups"]  # in the order of the episode types, whatever the order asked for
    mean = sum(jump.values()) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in jump.values()) / 2)
    assert perm["metrics"]["addprim_jump"]["mean"] == pytest.approx(mean)
    assert perm["metrics"]["addprim_jump"]["sd"] == pytest.approx(sd)
    assert perm["metrics"]["addprim_jump"]["paper"] == 99.95
    assert perm["metrics"]["validation_generalization"]["mean"] == pytest.approx(91.0)
    assert perm["train_seconds"]["mean"] == pytest.approx(120.0)
    # The failed ME seed is reported, not averaged in; a single seed has no sd.
    me_gen = me["metrics"]["validation_generalization"]
    assert (me_gen["mean"], me_gen["sd"], me_gen["n"], me_gen["paper"]) == (100.0, None, 1, 100.0)
    assert me["failed"] == [{"seed": 1, "status": "failed", "error": None}]
    table = (tmp_path / "results.md").read_text()
    assert f"{mean:.2f} ± {sd:.2f} (n=3)" in table and "ME/full/seed1: failed" in table
    # Each finished run's own row under the aggregate (the failed seed has none).
    per_run = table.split("Per run:")[1]
    for seed, value in jump.items():
        assert f"| scan_prim_permutation | full | {seed} | {90.0 + seed:.2f} | 100.00 | {value:.2f} | 100 |" in per_run
    assert "| ME | full | 0 | 100.00 | 100.00 | - | 100 |" in per_run and "| ME | full | 1 |" not in per_run
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_aggregate_makes_one_table_of_runs_trained_into_other_folders(tmp_path, capsys, monkeypatch):
    """Runs trained by two grids, their small files copied into one folder (no checkpoint), make one table with
    `cli.py aggregate`, each run's row with the commit it trained at."""
    from cli import cli, run_cli
    out = tmp_path / "table"
    for seed, jump in ((0, 99.0), (1, 97.0)):
        write_fake_run(out, Run("scan_prim_permutation", "full", seed), "done", {
            "validation": {"generalization": 90.0, "retrieval": 100.0}, "addprim_jump": {"accuracy": jump}})
    results = out / "scan_prim_permutation/full/seed1/eval/results.json"
    report = json.loads(results.read_text())
    report["checkpoint"]["provenance"] = {"git_commit": "c857bf4dfd141f3b", "device": "cpu", "cpu": "AMD EPYC"}
    results.write_text(json.dumps(report))

    monkeypatch.setattr(sys, "argv", [str(ROOT / "cli.py"), "aggregate", "--out", str(out)])
    assert run_cli(cli, sys.argv[1:]) == 0
    assert capsys.readouterr().out == f"aggregate: {out / 'results.md'} (2 runs)\n"
    summary = assert_no_machine_folder(out)
    (perm,) = summary["groups"]
    assert perm["metrics"]["addprim_jump"]["mean"] == pytest.approx(98.0) and perm["finished"] == 2
    assert summary["provenance"]["command"] == "cli.py aggregate --out ." and summary["grid"] == {"out": "."}
    assert "| scan_prim_permutation | full | 1 | 90.00 | 100.00 | 97.00 | 100 | 2m00s | cpu (AMD EPYC) | c857bf4 |" in (
        out / "results.md").read_text()


@pytest.mark.parametrize("make, message", [
    (lambda path: None, "error: no folder "),
    (lambda path: (path / "ME/full/seed0").mkdir(parents=True), "error: no run under "),
])
def test_aggregate_of_a_folder_without_runs_is_one_line(tmp_path, capsys, make, message):
    from cli import cli, run_cli
    out = tmp_path / "runs"
    make(out)
    assert run_cli(cli, ["aggregate", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err
    assert not (out / "results.json").exists()


def strings_in(value) -> list[str]:
    """Every string value in a JSON document, however deep."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return [value] if isinstance(value, str) else []


def assert_no_machine_folder(out: Path) -> dict:
    text_json, text_md = (out / "results.json").read_text(), (out / "results.md").read_text()
    summary = json.loads(text_json)
    absolute = [s for s in strings_in(summary) if s.startswith("/") or " /" in s or "=/" in s]
    assert not absolute, absolute
    assert str(out) not in text_json and str(out) not in text_md
    assert str(out.resolve()) not in text_json and str(out.resolve()) not in text_md
    return summary


def test_the_aggregate_names_paths_relative_to_the_grid_folder(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    done, failed = Run("ME", "full", 0), Run("ME", "full", 1)
    write_fake_run(out, done, "done", {"validation": {"generalization": 100.0, "retrieval": 100.0}})
    write_fake_run(out, failed, "failed", {})
    record = failed.dir(out) / "run.json"
    record.write_text(json.dumps({**json.loads(record.read_text()),
                                  "error": f"train exited 1: error: {out}/stores/seed1/ME is not a store"}))
    # The command line as a shell would give it: the program and --out as absolute paths.
    monkeypatch.setattr(sys, "argv", [str(ROOT / "cli.py"), "reproduce", "--out", str(out), "--seeds", "0,1",
                                      f"--slurm_folder={out}/slurm"])
    summary = aggregate_grid(out, [done, failed], {"out": str(out), "seeds": (0, 1), "slurm_folder": str(out / "slurm")})

    assert assert_no_machine_folder(out) == json.loads(json.dumps(summary))
    assert [row["dir"] for row in summary["runs"]] == ["ME/full/seed0", "ME/full/seed1"]
    assert (out / summary["runs"][0]["dir"] / "run.json").is_file()  # relative to OUT, the folder is there
    assert summary["paths"] == {"json": "results.json", "md": "results.md", "png": "results.png"}
    assert summary["grid"]["out"] == "." and summary["grid"]["slurm_folder"] == "slurm"
    assert summary["provenance"]["command"] == "cli.py reproduce --out . --seeds 0,1 --slurm_folder=slurm"
    assert summary["runs"][1]["error"] == "train exited 1: error: stores/seed1/ME is not a store"
    assert "ME/full/seed1: failed (train exited 1: error: stores/seed1/ME" in (out / "results.md").read_text()


def test_a_run_error_names_paths_relative_to_the_grid_folder_however_out_was_given(tmp_path, monkeypatch):
    """`--out runs` (relative, as users type it) reaches train as `runs/...`: the aggregate's error drops it, as
    it drops the absolute form; a folder that only ends in the same name is left alone."""
    from evalsuite.aggregate import without_folders
    monkeypatch.chdir(tmp_path)
    message = "interrupted: saved {}/ME/full/seed0/net_ME.pt; old_runs/ME and {}/x"
    for given in ("runs", "runs/", "./runs", str(tmp_path / "runs")):
        for written in ("runs", str(tmp_path / "runs")):
            assert without_folders(message.format(written, written), given) == (
                "interrupted: saved ME/full/seed0/net_ME.pt; old_runs/ME and x")
    assert without_folders("error: nested/runs/ME is not a store", "runs") == "error: nested/runs/ME is not a store"


@pytest.mark.slow
def test_aggregate_of_a_grid_s_small_files_equals_the_grid_s_own(tiny_grid, tmp_path):
    """`cli.py aggregate` on copies of run.json and eval/results.json alone gives reproduce's table."""
    out, _ = tiny_grid
    copy = tmp_path / "copy"
    for path in [*out.glob("*/*/seed*/run.json"), *out.glob("*/*/seed*/eval/results.json")]:
        (copy / path.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(out)).write_bytes(path.read_bytes())
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "aggregate", "--out", str(copy)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    grid, copied = json.loads((out / "results.json").read_text()), json.loads((copy / "results.json").read_text())
    assert copied["groups"] == grid["groups"] and copied["runs"] == grid["runs"]
    assert (copy / "results.md").read_text().split("\n", 2)[2] == (out / "results.md").read_text().split("\n", 2)[2]


@pytest.mark.slow
def test_a_tiny_grid_aggregate_names_no_folder_of_the_machine(tiny_grid):
    out, result = tiny_grid
    summary = assert_no_machine_folder(out)
    assert sorted(row["dir"] for row in summary["runs"]) == [
        f"{e}/full/seed{s}" for e in ("ME", "scan_around_right") for s in (0, 1)]
    assert "--out ." in summary["provenance"]["command"] and summary["grid"]["out"] == "."
    assert f"aggregate: {out / 'results.md'}" in result.stdout  # the terminal still says where it is


def test_the_committed_aggregate_names_no_absolute_path():
    summary = json.loads((ROOT / "docs" / "results.json").read_text())
    absolute = [s for s in strings_in(summary) if s.startswith("/") or " /" in s]
    assert not absolute, absolute
    assert {row["dir"] for row in summary["runs"]} >= {"ME/full/seed0", "scan_length/full/seed0"}
    assert "/work" not in (ROOT / "docs" / "results.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--experiments", "ME,nope"], "unknown experiment 'nope'"),
    pytest.param(["--variants", "full,no_memry"], "unknown variant 'no_memry'", marks=pytest.mark.slow),
    pytest.param(["--seeds", "0,x"], "--seeds must be comma-separated integers", marks=pytest.mark.slow),
    pytest.param(["--jobs", "0"], "--jobs and --threads must be at least 1", marks=pytest.mark.slow),
])
def test_a_bad_grid_is_one_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "runs"
    result = reproduce(out, *args)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not out.exists()


def test_a_second_reproduce_on_the_same_folder_fails_at_once(tmp_path):
    from filelock import FileLock
    with FileLock(tmp_path / ".reproduce.lock"):  # as a running reproduce holds it
        result = reproduce(tmp_path, "--experiments", "ME", *TINY)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: another reproduce is running on {tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".reproduce.lock"]  # nothing else was started


@pytest.mark.slow
def test_a_grid_with_a_failed_run_ends_in_one_error_line_after_its_aggregate(tmp_path):
    (Run("ME", "full", 1).checkpoint(tmp_path)).mkdir(parents=True)  # train refuses to write over it
    result = reproduce(tmp_path, "--experiments", "ME", "--seeds", "0,1", "--separate", *TINY)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: 1 run(s) of the grid failed: ME/full/seed1 ")
    assert result.stderr.count("\n") == 1
    assert "ME/full/seed1: failed" in (tmp_path / "results.md").read_text()
    assert json.loads((Run("ME", "full", 0).dir(tmp_path) / "run.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_killed_part_way_it_skips_finished_runs_and_resumes_the_other(tmp_path):
    """Seed 0 finishes; seed 1 is interrupted mid-training; the same command then finishes only seed 1, from its
    checkpoint, and the metrics show no episode trained twice."""
    args = ["--experiments", "ME", "--seeds", "0,1", "--jobs", "1", "--num_episodes", "1600", "--emb_size", "16",
            "--nlayers", "1", "--batch_size", "8", "--threads", "1", "--val_every", "80", "--checkpoint_every", "80",
            "--separate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Started as a shell starts `cmd &` (SIGINT ignored, which Python keeps): `kill -INT` must stop it all the same.
    grid = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "reproduce", "--out", str(tmp_path), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    second = Run("ME", "full", 1)
    deadline = time.time() + 300
    while not second.checkpoint(tmp_path).is_file() and time.time() < deadline and grid.poll() is None:
        time.sleep(0.05)
    grid.send_signal(signal.SIGINT)
    stdout, stderr = grid.communicate(timeout=120)
    assert grid.returncode == 130, stderr
    interrupted_at = torch.load(second.checkpoint(tmp_path), weights_only=True)["episodes_done"]
    assert (f"ME/full/seed1: INTERRUPTED at episode {interrupted_at} of 1600, with a checkpoint of every episode "
            "trained; the same reproduce command resumes it") in stdout
    assert 0 < interrupted_at < 1600, "the run finished before the interrupt: make it longer"
    assert json.loads((second.dir(tmp_path) / "run.json").read_text())["status"] == "interrupted"

    first_ckpt = Run("ME", "full", 0).checkpoint(tmp_path)
    first_mtime = first_ckpt.stat().st_mtime_ns
    again = subprocess.run([sys.executable, str(ROOT / "cli.py"), "reproduce", "--out", str(tmp_path), *args], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "[skip] ME/full/seed0" in again.stdout and f"[resume] ME/full/seed1: from episode {interrupted_at}" in again.stdout
    assert first_ckpt.stat().st_mtime_ns == first_mtime
    assert torch.load(second.checkpoint(tmp_path), weights_only=True)["episodes_done"] == 1600
    episodes = [json.loads(line)["episodes"] for line in open(second.dir(tmp_path) / "net_ME.metrics.jsonl")]
    assert episodes == sorted(set(episodes)) and episodes[-1] == 1600  # increasing: nothing trained twice
    assert json.loads((second.dir(tmp_path) / "run.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_a_killed_stack_resumes_every_seed_from_its_checkpoint(tmp_path):
    """Two seeds in one stack, interrupted mid-training: both checkpoint at the same episode, and the same
    command resumes the stack from there; no episode is trained twice."""
    args = ["--experiments", "ME", "--seeds", "0,1", "--num_episodes", "800", "--emb_size", "16", "--nlayers", "1",
            "--threads", "1", "--val_every", "40", "--checkpoint_every", "40", "--num_val_episodes", "2", "--stacked"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    grid = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "reproduce", "--out", str(tmp_path), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = [Run("ME", "full", 0), Run("ME", "full", 1)]
    deadline = time.time() + 300
    while not runs[1].checkpoint(tmp_path).is_file() and time.time() < deadline and grid.poll() is None:
        time.sleep(0.05)
    grid.send_signal(signal.SIGINT)
    _, stderr = grid.communicate(timeout=120)
    assert grid.returncode == 130, stderr
    stopped = {torch.load(r.checkpoint(tmp_path), weights_only=True)["episodes_done"] for r in runs}
    assert len(stopped) == 1 and 0 < min(stopped) < 800, stopped
    again = subprocess.run([sys.executable, str(ROOT / "cli.py"), "reproduce", "--out", str(tmp_path), *args],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for run in runs:
        assert f"[resume] {run.name}: from episode {min(stopped)}" in again.stdout
        assert torch.load(run.checkpoint(tmp_path), weights_only=True)["episodes_done"] == 800
        episodes = [json.loads(line)["episodes"] for line in open(run.dir(tmp_path) / "net_ME.metrics.jsonl")]
        assert episodes == list(range(40, 801, 40))
        assert json.loads((run.dir(tmp_path) / "run.json").read_text())["status"] == "done"


def test_stacks_are_planned_by_experiment_variant_and_starting_point(tmp_path):
    from evalsuite.grid import ReproduceConfig, RunState, plan_jobs
    cfg = ReproduceConfig(experiments=("ME",), seeds=(0, 1, 2, 3, 4), variants=("full", "no_memory"), stack_size=2,
                          separate=False, jobs=1)
    runs = [Run("ME", v, s) for v in ("full", "no_memory") for s in range(5)]
    states = {r: RunState("new") for r in runs}
    states[Run("ME", "full", 4)] = RunState("partial", 300)
    states[Run("ME", "no_memory", 0)] = RunState("trained", 10000)
    jobs = [(j.name, j.stacked) for j in plan_jobs(cfg, runs, states)]
    assert jobs == [("ME/full/seeds0,1", True), ("ME/full/seeds2,3", True), ("ME/full/seed4", False),
                    ("ME/no_memory/seed0", False), ("ME/no_memory/seeds1,2", True), ("ME/no_memory/seeds3,4", True)]
    separate = ReproduceConfig(experiments=("ME",), seeds=(0, 1), separate=True)
    assert [len(j.runs) for j in plan_jobs(separate, runs[:2], states)] == [1, 1]
    spread = ReproduceConfig(experiments=("ME",), seeds=(0, 1, 2, 3), jobs=2, separate=False)  # a stack per job
    assert [j.name for j in plan_jobs(spread, runs[:4], {r: RunState("new") for r in runs})] == [
        "ME/full/seeds0,1", "ME/full/seeds2,3"]


def test_the_default_arrangement_is_one_thread_runs_side_by_side_on_a_cpu(monkeypatch):
    import torch

    from evalsuite.grid import ReproduceConfig
    from pipeline.threads import usable_cores
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = ReproduceConfig(experiments=("ME",), seeds=(0, 1, 2, 3))
    assert cpu.separate is True and cpu.jobs == usable_cores() and cpu.threads_per_job == 1
    assert ReproduceConfig(experiments=("ME",), train={"device": "cuda"}).separate is False  # a GPU: stacks, one job
    assert ReproduceConfig(experiments=("ME",), train={"device": "cuda"}).jobs == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ReproduceConfig(experiments=("ME",)).separate is False
    assert ReproduceConfig(experiments=("ME",), stack_size=4, separate=False).separate is False


def test_threads_per_job_split_the_cores_and_a_lone_job_adapts(tmp_path):
    from evalsuite.commands import eval_command, train_command
    from evalsuite.grid import ReproduceConfig
    from pipeline.threads import usable_cores
    run = Run("ME", "full", 0)

    def threads_flag(**kwargs) -> str | None:
        cfg = ReproduceConfig(experiments=["ME"], seeds=[0], variants=["full"], out=str(tmp_path), **kwargs)
        commands = train_command(cfg, (run,), resume=False), eval_command(cfg, run)
        flags = [c[c.index("--threads") + 1] if "--threads" in c else None for c in commands]
        assert flags[0] == flags[1]
        return flags[0]

    assert threads_flag(jobs=1) is None                 # the job's own policy adapts to the load
    assert threads_flag(jobs=2) == str(max(1, usable_cores() // 2))
    assert threads_flag(jobs=1, threads=3) == "3"
    assert threads_flag(jobs=2, threads=5) == "2"


def test_a_jobs_train_command_is_read_back_by_train_as_the_runs_one_config(tmp_path):
    """The grid describes a run once (expected_config); the command line written from it, parsed by `cli.py
    train` itself, gives that same TrainConfig, for one run and for each model of a stack."""
    from dataclasses import replace

    from cli import train
    from evalsuite.commands import train_command
    from evalsuite.grid import ReproduceConfig, expected_config
    from trainer.config import TrainConfig
    cfg = ReproduceConfig(experiments=("ME",), seeds=(0, 3), variants=("no_memory",), out=str(tmp_path), jobs=1,
                          train={"lr": 2e-3, "mask_query_padding": True, "dropout": 0.0, "workers": 0})
    runs = (Run("ME", "no_memory", 0), Run("ME", "no_memory", 3))

    def parsed(command: list[str]) -> TrainConfig:
        assert command[1:4] == ["-m", "cli", "train"]
        params = train.make_context("train", command[4:]).params
        return TrainConfig(**{k: v for k, v in params.items() if v is not None and k != "threads"})

    single = parsed(train_command(cfg, runs[1:], resume=True))
    assert single == replace(expected_config(cfg, runs[1]), generate_missing_store=False, progress=False, resume=True)
    assert single.lr == 2e-3 and single.dropout == 0.0 and single.workers == 0 and single.disable_memory
    stack = parsed(train_command(cfg, runs, resume=False))
    assert stack.seeds == "0,3" and stack.store.endswith("seed{seed}/ME") and stack.dir_model == str(runs[0].dir(tmp_path).parent)
    for run in runs:  # each model of the stack: its own store and folder, else the run's config
        member = replace(stack, seeds=None, seed=run.seed, store=stack.store.format(seed=run.seed),
                         dir_model=str(run.dir(tmp_path)), resume=False)
        assert member == replace(expected_config(cfg, run), generate_missing_store=False, progress=False)


def test_reproduce_passes_only_trains_grid_settings():
    from evalsuite.grid import ReproduceConfig
    from pipeline.errors import UserError
    with pytest.raises(UserError, match="does not pass 'seed' to train"):
        ReproduceConfig(experiments=("ME",), train={"seed": 3})


# A grid that runs one step, whose command writes a line every 0.2 s; the test kills the grid's whole process
# group with SIGKILL, as the end of a session or a lost machine does.
HARD_KILLED_STEP = """
import sys, time
from evalsuite.aggregate import Run
from evalsuite.grid import ReproduceConfig, RunRecord
from evalsuite.supervise import Supervisor
cfg = ReproduceConfig(experiments=("ME",), out=sys.argv[1])
run = Run("ME", "full", 0)
run.dir(cfg.out).mkdir(parents=True)
ticks = "import time\\nwhile True: print('tick', flush=True); time.sleep(0.2)"
grid = Supervisor(cfg, print, own_sessions=False)  # the step stays in this process group, to die with it
grid.step({run: RunRecord.load(cfg, run)}, "train", [sys.executable, "-c", ticks], run.dir(cfg.out) / "train.log")
"""


def test_an_attempt_cut_off_by_a_hard_kill_is_counted_from_its_log(tmp_path):
    """run.json holds an attempt from its start; after a SIGKILL, the next load closes it with the time from its
    start to its log's last write, and adds that to the run's train time once."""
    from evalsuite.grid import ReproduceConfig, RunRecord
    run, out = Run("ME", "full", 0), tmp_path / "grid"
    grid = subprocess.Popen([sys.executable, "-c", HARD_KILLED_STEP, str(out)], cwd=ROOT, start_new_session=True)
    record_path, log = run.dir(out) / "run.json", run.dir(out) / "train.log"
    deadline = time.time() + 60
    # Lines that are "tick" alone: the log's first line, the command, holds the word too.
    while not (log.is_file() and log.read_text().splitlines().count("tick") >= 10) and time.time() < deadline:
        time.sleep(0.05)
    opened = json.loads(record_path.read_text())["attempts"]
    assert [(a["step"], a["seconds"], a["exit_code"]) for a in opened] == [("train", None, None)]
    os.killpg(grid.pid, signal.SIGKILL)
    grid.wait()
    time.sleep(0.5)  # the ticking child is gone with its group: the log stays as it is
    started = time.mktime(time.strptime(opened[0]["started"], "%Y-%m-%dT%H:%M:%S"))
    ran_for = log.stat().st_mtime - started

    cfg = ReproduceConfig(experiments=("ME",), out=str(out))
    record = RunRecord.load(cfg, run)
    [attempt] = record.attempts
    assert attempt["cut_off"] is True and attempt["exit_code"] is None
    assert attempt["seconds"] == pytest.approx(ran_for, abs=0.1) and attempt["seconds"] >= 1.8  # 10 ticks at least
    assert record.train_seconds == attempt["seconds"]
    record.save(cfg, run)
    assert RunRecord.load(cfg, run).train_seconds == attempt["seconds"]  # counted once
