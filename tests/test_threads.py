"""The thread policy (pipeline/threads.py): what it picks, and that every torch command applies it before
torch loads, in a fresh process, as a user would run it."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli import cli, run_cli
from pipeline import threads

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from machine import competing_job  # noqa: E402  (the benchmarks' busy process, here as the load to detect)

ROOT = Path(__file__).parents[1]
TORCH_COMMANDS = ("train", "eval", "predict")  # those that exist must take --threads

# Runs the CLI in this fresh process, then reports what torch and the policy ended up with. The commands
# fail fast on purpose (after importing torch, before any work): the policy must already be in place.
PROBE = """
import json, os, sys
import cli
code = cli.run_cli(cli.cli, sys.argv[1:])
import torch
from pipeline import threads
print(json.dumps({"code": code, "torch_threads": torch.get_num_threads(), "applied": threads.applied(),
                  "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}))
"""
FAILING_FAST = {"train": ["train", "--num_episodes", "0"],
                "eval": ["eval", "--checkpoint", "no_such_checkpoint.pt"]}


def probe(args: list[str], env: dict[str, str], tmp_path: Path) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in (*threads.THREAD_VARS, threads.SPIN_VAR, threads.WAIT_POLICY_VAR)}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(FAILING_FAST))
def test_threads_flag_reaches_torch_before_it_loads(command, tmp_path):
    # OMP_NUM_THREADS=2 in the environment: --threads 1 must win over it.
    result = probe([*FAILING_FAST[command], "--threads", "1"], {"OMP_NUM_THREADS": "2"}, tmp_path)
    assert result["code"] == 1  # the deliberate failure, after the policy
    assert result["torch_threads"] == 1
    assert result["applied"] == {"threads": 1, "spincount": threads.SHORT_SPINCOUNT, "wait_policy": None,
                                 "before_torch": True, "adaptive": False, "others_busy": None}
    assert result["GOMP_SPINCOUNT"] == threads.SHORT_SPINCOUNT


@pytest.mark.slow
def test_default_policy_and_users_wait_policy(tmp_path):
    result = probe(FAILING_FAST["train"], {"OMP_WAIT_POLICY": "passive"}, tmp_path)
    assert result["torch_threads"] == threads.usable_cores() == result["applied"]["threads"]
    assert result["GOMP_SPINCOUNT"] is None  # the user chose how threads wait: no spin count added
    assert result["applied"]["wait_policy"] == "passive"


def test_every_torch_command_takes_threads():
    present = [name for name in TORCH_COMMANDS if name in cli.commands]
    assert {"train", "eval"} <= set(present)
    for name in present:
        assert "threads" in {p.name for p in cli.commands[name].params}, name


def test_threads_must_be_positive(capsys):
    assert run_cli(cli, ["train", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--threads" in err and err.count("\n") == 1


def test_thread_env_resolution():
    assert threads.thread_env(3, environ={}) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3",
                                                 "GOMP_SPINCOUNT": "1000"}
    # $OMP_NUM_THREADS is the default; a user's GOMP_SPINCOUNT is kept; OMP_WAIT_POLICY means no spin count.
    assert threads.thread_env(None, environ={"OMP_NUM_THREADS": "5", "GOMP_SPINCOUNT": "7"}) == {
        "OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5", "GOMP_SPINCOUNT": "7"}
    assert "GOMP_SPINCOUNT" not in threads.thread_env(2, environ={"OMP_WAIT_POLICY": "active"})
    for unusable in ("", "0", "two"):
        assert threads.resolve_threads(None, environ={"OMP_NUM_THREADS": unusable}) == threads.usable_cores()
    with pytest.raises(ValueError):
        threads.resolve_threads(0)


def test_cgroup_quota():
    assert threads.cgroup_cpu_limit("max 100000\n") is None
    assert threads.cgroup_cpu_limit("200000 100000\n") == 2
    assert threads.cgroup_cpu_limit("50000 100000") == 1   # half a CPU still gets one thread
    assert threads.cgroup_cpu_limit("garbage") is None
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


# ---- the adaptive policy -------------------------------------------------------------------------------------

STAT = """cpu  300 0 100 600 0 0 0 0 0 0
cpu0 100 0 50 300 0 0 0 0 0 0
cpu1 200 0 50 300 0 0 0 0 0 0
intr 12345
"""


def test_busy_ticks_count_only_our_cpus():
    assert threads.busy_and_total_ticks(STAT, {0, 1}) == (400, 1000)
    assert threads.busy_and_total_ticks(STAT, {1}) == (250, 550)  # idle (and iowait) are not busy
    assert threads.busy_and_total_ticks(STAT, {7}) == (0, 0)


def test_free_cores_and_the_adaptive_env():
    assert [threads.free_cores(2, busy) for busy in (0.0, 0.4, 0.6, 1.0, 1.6, 2.0)] == [2, 2, 1, 1, 1, 1]
    # a quota of 2 cores on a 16-CPU host: others' load counts only when it leaves fewer than 2 CPUs idle
    assert [threads.free_cores(2, busy, cpus=16) for busy in (0.0, 12.0, 14.6, 15.0)] == [2, 2, 1, 1]
    cores = threads.usable_cores()
    quiet = threads.thread_env(None, environ={}, others_busy=0.0)
    assert quiet == {"OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores), "GOMP_SPINCOUNT": "300000"}
    if cores > 1:
        busy = threads.thread_env(None, environ={}, others_busy=1.0)
        assert busy == {"OMP_NUM_THREADS": str(cores - 1), "MKL_NUM_THREADS": str(cores - 1),
                        "GOMP_SPINCOUNT": threads.SHORT_SPINCOUNT}
    # anything the user set turns the adaptation off: the load is ignored
    for environ in ({"OMP_NUM_THREADS": "1"}, {"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "passive"}):
        assert not threads.is_adaptive(None, environ)
        assert threads.thread_env(None, environ=environ, others_busy=0.0).get("GOMP_SPINCOUNT") != "300000"
    assert not threads.is_adaptive(2, {})


def test_others_busy_sees_a_busy_process_and_not_this_one():
    """A busy loop in another process counts, this (sleeping) process does not. The rest of the machine (a
    pytest-xdist neighbour, say) may change between the two windows, so up to three tries must see the loop."""
    seen = []
    for _ in range(3):
        own = threads.others_busy_cores(0.5)  # this process sleeps; whatever else runs on the machine counts
        with competing_job(30):
            time.sleep(0.3)
            with_spinner = threads.others_busy_cores(1.0)
        seen.append((own, with_spinner))
        if with_spinner >= 0.6 and with_spinner >= min(own + 0.5, len(threads._cpus())) - 0.4:
            return
    raise AssertionError(f"(before, with a busy loop) in three tries: {seen}")


def test_a_resumed_run_keeps_the_count_it_was_trained_with_unless_the_user_fixed_one(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "_applied", {"adaptive": True, "threads": 2})
    assert threads.keep_for_run(1, calls.append) == 1 and calls == [1]
    assert threads.applied()["kept_from_checkpoint"] is True
    assert threads.keep_for_run(None, calls.append) == 1 and calls == [1]  # a checkpoint that records none
    monkeypatch.setattr(threads, "_applied", {"adaptive": False, "threads": 2})
    assert threads.keep_for_run(1, calls.append) == 2 and calls == [1]     # --threads 2: the user's count


def test_a_run_resumed_under_the_adaptive_policy_is_bitwise_its_uninterrupted_twin(monkeypatch, tmp_path):
    from pipeline import store as episode_store
    from trainer.checkpoint import load_checkpoint
    from trainer.config import TrainConfig
    from trainer.train import train
    store = episode_store.generate(episode_store.GenerateConfig(
        "ME", num_episodes=64, shard_size=32, out=str(tmp_path / "store"), progress=False, workers=1))
    tiny = dict(store=str(store), emb_size=16, nlayers=1, batch_size=4, num_episodes=32, val_every=8,
                progress=False, workers=0)
    monkeypatch.setattr(threads, "_applied", {"adaptive": True, "threads": 1, "others_busy": 0.0})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(TrainConfig(dir_model=str(tmp_path / "whole"), **tiny))
        train(TrainConfig(dir_model=str(tmp_path / "resumed"), stop_after=16, **tiny))
        torch.set_num_threads(2)  # the load changed: the adaptive policy would now take both cores
        train(TrainConfig(dir_model=str(tmp_path / "resumed"), resume=True, **tiny))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    whole, resumed = (load_checkpoint(tmp_path / d / "net_ME.pt") for d in ("whole", "resumed"))
    assert whole["threads"] == resumed["threads"] == 1 and resumed["episodes_done"] == 32
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


@pytest.mark.slow
def test_adaptive_policy_in_a_fresh_process(tmp_path):
    """No thread variable set: beside a busy process, train takes the cores it leaves (with the short spin)."""
    cores = threads.usable_cores()
    with contextlib.ExitStack() as spinners:
        for _ in range(cores):  # every core busy: one thread is left
            spinners.enter_context(competing_job(60))
        time.sleep(0.3)
        result = probe(FAILING_FAST["train"], {}, tmp_path)
    assert result["applied"]["adaptive"] is True
    assert result["applied"]["others_busy"] >= cores - 0.6
    assert result["torch_threads"] == 1 == result["applied"]["threads"]
    assert result["GOMP_SPINCOUNT"] == threads.SHORT_SPINCOUNT
