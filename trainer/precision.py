"""Which reduced precisions this machine can train in, found by trying rather than by reading CPU flags.

CPU bf16 autocast runs the LSTMs through oneDNN, which refuses ("could not create a primitive descriptor for
the LSTM forward propagation primitive") on CPUs without native bf16, such as AVX2-only ones. A flag check
would have to track oneDNN's own rules; a tiny LSTM forward and backward under autocast asks oneDNN itself.
"""
from __future__ import annotations

import functools

import torch

from pipeline.errors import UserError

AMP_CHOICES = ("none", "bf16")


@functools.lru_cache(maxsize=None)
def cpu_bf16_problem() -> str | None:
    """None if an LSTM trains under CPU bf16 autocast here, else why not (one line). Cached: ~10 ms once."""
    generator = torch.Generator().manual_seed(0)  # not the global RNG: probing must not change a run's draws
    lstm = torch.nn.LSTM(8, 8, num_layers=1, batch_first=True, bidirectional=True)
    inputs = torch.randn(2, 3, 8, generator=generator, requires_grad=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = lstm(inputs)
        out.float().sum().backward()
    except RuntimeError as err:  # oneDNN's refusal; its message runs to many lines
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        return f"this CPU cannot run the LSTMs in bf16 ({first.split('. ')[0].rstrip('.')})"
    return None


def amp_problem(amp: str, device_type: str, cpu_bf16_problem: str | None) -> str | None:
    """Why `--amp amp` cannot run on `device_type`, given the CPU probe's answer; None if it can."""
    if amp not in AMP_CHOICES:
        return f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}"
    if amp == "bf16" and device_type == "cpu" and cpu_bf16_problem:
        return f"--amp bf16: {cpu_bf16_problem}; use --amp none"
    return None


def use_exact_fp32(device: torch.device) -> None:
    """fp32 on a GPU means fp32, as on the CPU and on the paper's GPUs: cuDNN's default lets the LSTMs multiply
    in TF32 (a 10-bit mantissa) on Ampere and later cards. Process-wide; bf16 autocast is unaffected (its
    products are bf16 either way)."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def check_amp(amp: str, device_type: str) -> None:
    """Refuse an autocast mode this device cannot run, before any work or any file is written."""
    if amp == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU has no bf16 support; use --amp none")
    problem = amp_problem(amp, device_type, cpu_bf16_problem() if amp == "bf16" and device_type == "cpu" else None)
    if problem:
        raise UserError(problem)
