"""What a benchmark needs to know about, and do to, the machine it runs on; no torch here.

- cpu_info(): the CPU model and the flags that decide which kernels run (a speed ratio means something only
  with the CPU named: the same cloud machine kind is sometimes an AVX2-only CPU with a third of the fp32 peak
  of an AVX-512 one, and bf16 is native only with avx512_bf16 or AMX).
- competing_job(): one CPU-bound process beside the measurement, started and stopped here, bounded in time.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")

# A pure-Python busy loop that ends by itself after argv[1] seconds, even if its parent dies.
BUSY_LOOP = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


def cpu_info(cpuinfo_text: str) -> dict:
    """The model name, logical CPU count and the kernel-relevant flags from the text of /proc/cpuinfo.

    "amx" is true with any AMX flag; "native_bf16" with avx512_bf16 or amx_bf16 (where --amp bf16 can pay).
    """
    model, flags, logical = None, set(), 0
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            logical += 1
        elif key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    found = {flag: flag in flags for flag in FLAGS}
    return {"model": model, "logical_cpus": logical, "flags": found,
            "amx": any(flag.startswith("amx") for flag in flags),
            "native_bf16": found["avx512_bf16"] or found["amx_bf16"]}


def read_cpu_info() -> dict:
    try:
        return cpu_info(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no flags to report
        import platform
        return {"model": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                "flags": {flag: None for flag in FLAGS}, "amx": None, "native_bf16": None}


@contextlib.contextmanager
def competing_job(seconds_bound: float):
    """One CPU-bound process for the duration of the block (never longer than seconds_bound)."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(seconds_bound)])
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait()


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def threads_arg(argv: list[str]) -> int | None:
    """--threads N from a benchmark's command line, read before argparse proper: the thread policy
    (pipeline.threads.apply) must be set before torch is imported."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_known_args(argv)[0].threads
