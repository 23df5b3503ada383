"""Matrix-multiply FLOPs of the model on valid tokens only, counted analytically, and the machine's fp32 peak.

Why analytic: torch's FlopCounterMode does not see the fused CPU LSTM kernel (oneDNN) that an unpacked
nn.LSTM call runs, so on CPU it counts 0 for such an LSTM; and a count on a real batch would include
whatever padding the implementation still computes. The formula below counts, per episode, the work on
real tokens only (EOS included, padded items and steps excluded), 2 FLOPs per multiply-add, matrix products
only (as FlopCounterMode does). tests/test_compare.py checks it equals FlopCounterMode (with oneDNN off, so
the LSTMs decompose into counted matrix products) on a batch that has no padding at all.

A training step is counted as 3x the forward (the backward of a matrix product costs two of them), the
usual convention; a few products of the backward are skipped in practice (nothing flows into the zero
initial states), so the true count is slightly lower.
"""
from __future__ import annotations

import time

import torch

TRAIN_FLOPS_PER_FORWARD = 3


def lstm_flops_per_token(input_size: int, hidden: int, nlayers: int, bidirectional: bool) -> int:
    """Forward FLOPs of one token through a stacked LSTM: 4 gates, input and recurrent products."""
    directions = 2 if bidirectional else 1
    total = 0
    for layer in range(nlayers):
        layer_input = input_size if layer == 0 else hidden * directions
        total += directions * 2 * 4 * hidden * (layer_input + hidden)
    return total


def forward_flops(batch, cfg) -> torch.Tensor:
    """Forward FLOPs on valid tokens, per episode: (B,) long. batch: trainer.batch.EpisodeBatch;
    cfg: trainer.model.ModelConfig. Mirrors MetaSeq2Seq: encoders, memory attention, decoder, output layer."""
    E, V, L = cfg.emb_size, cfg.output_vocab_size, cfg.nlayers
    encoder = lstm_flops_per_token(E, E, L, bidirectional=True)
    q_in, q_out = batch.query_in_len, batch.query_out_len                 # (B, nq): 0 = padded query
    query_tokens, target_tokens = q_in.sum(1), q_out.sum(1)               # (B,)
    flops = encoder * query_tokens
    if not cfg.disable_memory:
        keys = batch.support_mask.sum(1)                                  # (B,) valid support items
        flops = flops + encoder * (batch.support_in_len.sum(1) + batch.support_out_len.sum(1))
        flops = flops + 4 * E * keys * query_tokens                       # scores and weighted sum over keys
        flops = flops + 2 * (2 * E) * E * query_tokens                    # memory_combine: [q; m] -> c
    flops = flops + (lstm_flops_per_token(E, E, L, bidirectional=False) + 2 * E * V) * target_tokens
    if not cfg.disable_attention:
        flops = flops + 4 * E * (q_in * q_out).sum(1)                     # each step over its query's steps
        flops = flops + 2 * (2 * E) * E * target_tokens                   # attn_combine: [h; ctx] -> hidden
    return flops


def train_flops(batch, cfg) -> torch.Tensor:
    """(B,) training-step FLOPs per episode, on valid tokens."""
    return TRAIN_FLOPS_PER_FORWARD * forward_flops(batch, cfg)


def matmul_peak_flops(device: torch.device | None = None, n: int = 2048, repeats: int = 20) -> float:
    """Measured fp32 FLOP/s of an n x n matrix product with the current thread setting."""
    device = device or torch.device("cpu")
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
