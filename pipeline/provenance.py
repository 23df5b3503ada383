"""Where a result came from: command line, project version and git commit, Python and torch, the machine.

Recorded in every checkpoint and every eval results.json, so that a number can be traced back to the code
and the command that made it. Never imports torch itself (the pipeline stage does not need it); the caller
passes the device name when it has one.
"""
from __future__ import annotations

import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def project_version() -> str:
    try:
        return metadata.version("metaseq2seq")
    except metadata.PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "unknown"


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The checkout's commit, with "-dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def collect(device: str | None = None) -> dict:
    """Plain data (strings only) for a checkpoint or a results.json."""
    return {
        "command": shlex.join(sys.argv),
        "version": project_version(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "cpu": cpu_name(),
        "device": device or "cpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
