"""The project as a user installs it: a built wheel in a fresh virtual environment, run from an empty folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with the project's wheel (and nothing of the checkout): its bin folder. It sees the
    packages already installed here (torch and the rest), so nothing is downloaded."""
    root = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(ROOT)], check=True, capture_output=True)
    venv.create(root / "venv", system_site_packages=True, with_pip=True)
    bin_dir = root / "venv" / "bin"
    wheel = next((root / "dist").glob("metaseq2seq-*.whl"))
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    return bin_dir


def run_installed(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([*args], cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_the_installed_command_trains_from_an_empty_folder(installed, tmp_path):
    result = run_installed(installed, tmp_path, str(installed / "metaseq2seq"), "train", "--num_episodes", "50",
                           "--emb_size", "16", "--val_every", "25", "--no_progress")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out_models" / "net_ME.pt").is_file() and (tmp_path / "shards" / "ME").is_dir()
    where = run_installed(installed, tmp_path, str(installed / "python"), "-c",
                          "import cli, trainer; print(cli.__file__); print(trainer.__file__)")
    assert str(ROOT) not in where.stdout and "site-packages" in where.stdout, where.stdout


@pytest.mark.slow
def test_python_dash_m_cli_is_the_same_command(installed, tmp_path):
    command = run_installed(installed, tmp_path, str(installed / "metaseq2seq"), "--help")
    module = run_installed(installed, tmp_path, str(installed / "python"), "-m", "cli", "--help")
    assert command.returncode == module.returncode == 0
    assert command.stdout.startswith("Usage: metaseq2seq ")
    assert command.stdout.replace("metaseq2seq", "cli.py") == module.stdout


@pytest.mark.slow
def test_an_installed_reproduce_writes_its_grid_where_it_was_started(installed, tmp_path):
    result = run_installed(installed, tmp_path, str(installed / "metaseq2seq"), "reproduce", "--experiments", "ME",
                           "--num_episodes", "16", "--emb_size", "16", "--nlayers", "1", "--batch_size", "8",
                           "--threads", "1", "--out", "grid")
    assert result.returncode == 0, result.stderr + result.stdout
    results = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert [run["status"] for run in results["runs"]] == ["done"]
