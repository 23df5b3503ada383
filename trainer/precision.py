"""Which reduced precisions this machine can train in, found by trying rather than by reading CPU flags.

The probe tries what a CPU training step runs under `--amp bf16`: a tiny MetaSeq2Seq's loss (memory,
attention, both LSTMs, with dropout, in training mode) forward under bf16 autocast and backward, and refuses
only if that fails or gives a non-finite loss or gradient. A flag check would have to track oneDNN's and
torch's own rules (oneDNN's bf16 nn.LSTM, for one, does not exist on AVX2-only CPUs, while the packed
recurrence of trainer/lstm.py runs there); trying asks them.
"""
from __future__ import annotations

import functools

import torch

from pipeline.errors import UserError

AMP_CHOICES = ("none", "bf16")


def bf16_training_step(autocast: bool = True) -> torch.Tensor:
    """The loss of one training step of a tiny model (E = 8, 2 layers, dropout) on the CPU under bf16
    autocast (without it: the same step in fp32), after its backward; raises what torch raises where a part
    of it cannot run in bf16. Under a forked RNG: probing must not change a run's draws (init, dropout)."""
    from trainer.data import Tokenizer, collate_episodes  # here: the model's modules, only when probing
    from trainer.model import MetaSeq2Seq, ModelConfig
    from pipeline.vocab import build_vocab
    tokenizer = Tokenizer(tuple(build_vocab(("dax", "lug", "wif"))), tuple(build_vocab(("RED", "BLUE", "GREEN"))))
    episode = {"support": [{"input": "dax", "output": "RED"}, {"input": "lug", "output": "BLUE"}],
               "query": [{"input": "dax lug wif", "output": "RED BLUE GREEN"}, {"input": "wif", "output": "GREEN"}]}
    batch = collate_episodes([episode, {**episode, "support": episode["support"][:1]}], tokenizer, True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MetaSeq2Seq(ModelConfig(len(tokenizer.input_vocab), len(tokenizer.output_vocab), emb_size=8,
                                        nlayers=2, dropout=0.1)).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model.loss(batch)
        loss.backward()
    if not torch.isfinite(loss) or not all(torch.isfinite(p.grad).all() for p in model.parameters()
                                           if p.grad is not None):
        raise RuntimeError("a bf16 training step gave a non-finite loss or gradient")
    return loss.detach()


@functools.lru_cache(maxsize=None)
def cpu_bf16_problem() -> str | None:
    """None if a training step of the model runs under CPU bf16 autocast here, else why not (one line).
    Cached: tens of ms once."""
    try:
        bf16_training_step()
    except RuntimeError as err:  # e.g. oneDNN's refusal; its message runs to many lines
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        return f"this CPU cannot train the model in bf16 ({first.split('. ')[0].rstrip('.')})"
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
