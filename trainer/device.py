"""Which device a run trains on, and how it is named in a run's summary and provenance."""
from __future__ import annotations

import sys

import torch

from pipeline import provenance
from pipeline.errors import UserError


def requested_device(device: str, gpu: int | None) -> str:
    """--device and the original code's --gpu N (--device cuda:N) as one device name; one line if they disagree.
    --gpu alone on a machine without CUDA trains on the CPU, with a warning, as the original does."""
    if gpu is None:
        return device
    if device not in ("auto", "cuda", f"cuda:{gpu}"):
        raise UserError(f"--gpu {gpu} conflicts with --device {device}: give one of them")
    if not torch.cuda.is_available():
        if device != "auto":
            raise UserError(f"--gpu {gpu} --device {device} asked for, but no CUDA device is available")
        # As the original's train.py, whose --gpu 0 is a default that a machine without a GPU ignores.
        print(f"warning: --gpu {gpu} asked for, but no CUDA device is available: training on the CPU",
              file=sys.stderr, flush=True)
        return "cpu"
    return f"cuda:{gpu}"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto, cpu, cuda (under torchrun: the process's local rank picks the GPU) or cuda:N."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda" and (index == "" and ":" not in name or index.isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but no CUDA device is available")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", int(index) if index else local_rank % count)
    if name != "cpu":
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({provenance.cpu_name()})"
