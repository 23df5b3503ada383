"""The thread policy (pipeline/threads.py): what it picks, and that every torch command applies it before
torch loads, in a fresh process, as a user would run it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import cli, run_cli
from pipeline import threads

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


@pytest.mark.parametrize("command", sorted(FAILING_FAST))
def test_threads_flag_reaches_torch_before_it_loads(command, tmp_path):
    # OMP_NUM_THREADS=2 in the environment: --threads 1 must win over it.
    result = probe([*FAILING_FAST[command], "--threads", "1"], {"OMP_NUM_THREADS": "2"}, tmp_path)
    assert result["code"] == 1  # the deliberate failure, after the policy
    assert result["torch_threads"] == 1
    assert result["applied"] == {"threads": 1, "spincount": threads.SHORT_SPINCOUNT, "wait_policy": None,
                                 "before_torch": True}
    assert result["GOMP_SPINCOUNT"] == threads.SHORT_SPINCOUNT


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
