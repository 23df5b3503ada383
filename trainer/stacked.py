"""The building blocks of M independent models of one configuration, trained in one process (`train --seeds`).

The paper's protocol takes one episode per optimizer step, which leaves a CPU or GPU mostly idle: each LSTM
step multiplies about (40 x 200) by (200 x 800). Batching episodes inside one model would change the science,
so the parallelism goes across independent runs instead: every weight gets a leading model dimension M, model
m reads its own episode(s), and one step runs the forward and backward of all M models as batched products
(`bmm`), with the packed recurrence (trainer/lstm.py) stepping all M models at once. The models share nothing but the step:
each has its own weights, data order, dropout stream, Adam moments (Adam is element-wise) and gradient clip.

Layout: a stacked batch is an EpisodeBatch of M*B episodes, model-major (episodes m*B .. m*B+B-1 are model
m's). Packed sequences are (M, S, ...): every model packs its own rows time-major as trainer.lstm.Packing
does, and all models share one step layout (StackedPacking), padding a model's shorter steps at their end.
Padded positions hold zeros going in and are never read coming out, so their gradients are exactly zero.
Empty rows (padded queries or support items, length 0) take no step at all, so each model's valid tokens are
exactly the tokens, in the order, of a single model given the same episodes: dropout drawn per model over its
valid tokens draws the very masks that `train --seed m` draws.

A stack of one runs an empty row for one step, as the single model does, and packs exactly as
trainer.lstm.Packing (StackedPacking.single); trainer/model.py runs it through the single model's modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.lstm import Packing, Recurrence


# ---- packing ------------------------------------------------------------------------------------------------

def _gather_rows(data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """data (M, R, ...), index (M, K) long -> (M, K, ...): data[m, index[m, k]]."""
    rows = torch.arange(data.shape[0], device=data.device).unsqueeze(1)
    return data[rows, index]


@dataclass
class StackedPacking:
    """How the (M, N) rows of width T of M models map to the packed layout (M, S, ...).

    Per model, rows are sorted longest first (stable) and packed time-major, as trainer.lstm.Packing does.
    All models share one step layout: step t holds n_t = the most rows any model still runs at t; a model
    with fewer has padding at the end of the step. Rows of length 0 never run."""
    batch_sizes: list[int]          # n_t, non-increasing
    sorted_indices: torch.Tensor    # (M, N) row at each slot of a step
    flat_index: torch.Tensor        # (M, S) packed position -> row * T + t, or N * T (a zero slot) for padding
    valid: torch.Tensor             # (M, S) bool
    last_index: torch.Tensor        # (M, N) packed position of each row's last token (0 for an empty row)
    first_index: torch.Tensor       # (M, N) packed position of each row's first token
    nonempty: torch.Tensor          # (M, N) bool
    reverse_index: torch.Tensor     # (M, S) position of the same row's mirrored step (t -> length - 1 - t)
    dropout_index: torch.Tensor     # (total valid,) m * S + s of each valid token, model-major, s ascending
    valid_counts: list[int]         # valid tokens per model
    rows: int
    width: int
    single: Packing | None = None   # M = 1: the same layout as trainer.lstm.Packing

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, width: int, device) -> "StackedPacking":
        """lengths (M, N) >= 0 on the CPU (the index arithmetic stays on the host). A stack of one runs an
        empty row for one step, as the single model does, so that it packs exactly as trainer.lstm.Packing."""
        lengths = lengths.to(torch.long).clamp(min=1 if lengths.shape[0] == 1 else 0)
        M, N = lengths.shape
        sorted_lengths, sorted_indices = torch.sort(lengths, dim=1, descending=True, stable=True)
        per_model = (torch.arange(width).view(1, -1, 1) < sorted_lengths.unsqueeze(1)).sum(2)   # (M, T)
        sizes = per_model.amax(0)
        steps = int((sizes > 0).sum())
        sizes, per_model = sizes[:steps], per_model[:, :steps]
        offsets = torch.cumsum(sizes, 0) - sizes
        step_of = torch.repeat_interleave(torch.arange(steps), sizes)                            # (S,)
        slot_of = torch.arange(len(step_of)) - offsets[step_of]
        valid = slot_of.unsqueeze(0) < per_model[:, step_of]                                     # (M, S)
        row = sorted_indices.gather(1, slot_of.expand(M, -1).clamp(max=N - 1))
        flat_index = torch.where(valid, row * width + step_of, N * width)
        unsorted = torch.empty_like(sorted_indices)
        unsorted.scatter_(1, sorted_indices, torch.arange(N).expand(M, -1).contiguous())
        last_step = (lengths - 1).clamp(min=0, max=max(steps - 1, 0))
        last_index = offsets[last_step] + unsorted if steps else torch.zeros_like(lengths)
        row_length = lengths.gather(1, row)
        mirror = offsets[(row_length - 1 - step_of).clamp(min=0, max=max(steps - 1, 0))] + slot_of
        reverse_index = torch.where(valid, mirror, torch.arange(len(step_of)))
        model_of, position = valid.nonzero(as_tuple=True)
        to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        single = Packing.from_lengths(lengths[0], width, device) if M == 1 else None
        return cls([int(n) for n in sizes], to(sorted_indices), to(flat_index), to(valid), to(last_index),
                   to(unsorted), to(lengths > 0), to(reverse_index), to(model_of * len(step_of) + position),
                   valid.sum(1).tolist(), N, width, single)

    @property
    def size(self) -> int:
        return self.flat_index.shape[1]

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(M, N, T, ...) -> (M, S, ...), zeros (or PAD_ID) at padding."""
        M = padded.shape[0]
        flat = padded.reshape((M, self.rows * self.width) + padded.shape[3:])
        flat = torch.cat([flat, flat.new_zeros((M, 1) + flat.shape[2:])], 1)
        return _gather_rows(flat, self.flat_index)

    def unpack(self, data: torch.Tensor) -> torch.Tensor:
        """(M, S, ...) -> (M, N, T, ...), zero at padded steps."""
        M = data.shape[0]
        out = data.new_zeros((M, self.rows * self.width + 1) + data.shape[2:])
        rows = torch.arange(M, device=data.device).unsqueeze(1)
        out = out.index_put((rows, self.flat_index), data)
        return out[:, :-1].reshape((M, self.rows, self.width) + data.shape[2:])

    def mirror(self, data: torch.Tensor) -> torch.Tensor:
        """Each row's tokens in reverse order (an involution); padding stays in place."""
        return _gather_rows(data, self.reverse_index)

    def at(self, data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """data (M, S, E) at per-row positions (M, N) -> (M, N, E), zero for empty rows."""
        return _gather_rows(data, index) * self.nonempty.unsqueeze(-1).to(data.dtype)


# ---- dropout with one stream per model ------------------------------------------------------------------------

def stacked_dropout(x: torch.Tensor, p: float, training: bool, packing: StackedPacking | None,
                    generators: list[torch.Generator] | None) -> torch.Tensor:
    """Dropout on packed x (M, S, F). With generators, model m's keep mask is drawn from its own generator over
    its valid tokens only, in packed order: the draws of trainer.lstm.dropout on a single model's packed
    tokens. Padding positions are dropped (they are zeros anyway)."""
    if not training or p == 0.0:
        return x
    if generators is None or packing is None:
        keep = torch.rand(x.shape, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))
        return x * keep.to(x.dtype)
    M, S, Fdim = x.shape
    draws = torch.cat([torch.rand((n, Fdim), generator=g, device=x.device)
                       for n, g in zip(packing.valid_counts, generators)])
    keep = x.new_zeros(M * S, Fdim)
    keep[packing.dropout_index] = draws.ge_(p).mul_(1.0 / (1.0 - p)).to(x.dtype)
    return x * keep.view(M, S, Fdim)


# ---- products with each model's own weights --------------------------------------------------------------

class _StackedLinear(torch.autograd.Function):
    """x (M, R, in) @ weight (M, out, in)^T + bias (M, out). Its own backward computes the weight gradient in
    the weight's layout (grad^T x): autograd's bmm backward would make it transposed, and every later use
    (accumulation, clipping, Adam) would copy it."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        return grad_x, torch.bmm(grad.transpose(1, 2), x), grad.sum(1)


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (M, ..., in), weight (M, out, in), bias (M, out) -> (M, ..., out)."""
    M = x.shape[0]
    out = _StackedLinear.apply(x.reshape(M, -1, x.shape[-1]), weight, bias)
    return out.view(x.shape[:-1] + (weight.shape[1],))


def stacked_embedding(weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """weight (M, V, E), tokens (M, ...) -> (M, ..., E)."""
    M = weight.shape[0]
    return _gather_rows(weight, tokens.reshape(M, -1)).view(tokens.shape + (weight.shape[2],))


def stacked_packed_lstm(lstm: nn.LSTM, x: torch.Tensor, packing: StackedPacking,
                        state: tuple[torch.Tensor, torch.Tensor] | None = None,
                        generators: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`lstm`, whose weights carry a leading model dimension M, over each model's packed x (M, S, in). state
    (h0, c0), each (layers * dirs, M, N, E) in row order, zeros when None. Returns (the last layer's output
    (M, S, dirs * E), h_n (layers * dirs, M, N, E)). The backward direction runs forward over each row
    mirrored; the dropout between layers draws from `generators` as stacked_dropout does."""
    directions, E, h_n = 1 + lstm.bidirectional, lstm.hidden_size, []
    M, N = packing.nonempty.shape
    sort = packing.sorted_indices.unsqueeze(-1).expand(-1, -1, E)
    for layer in range(lstm.num_layers):
        if layer > 0:
            x = stacked_dropout(x, lstm.dropout, lstm.training, packing, generators)
        outputs = []
        for d in range(directions):
            k, sfx = layer * directions + d, f"_l{layer}" + ("_reverse" if d else "")
            weight = lambda name: getattr(lstm, name + sfx)  # noqa: E731
            x_proj = stacked_linear(packing.mirror(x) if d else x, weight("weight_ih"), weight("bias_ih") + weight("bias_hh"))
            h0, c0 = (x.new_zeros(M, N, E),) * 2 if state is None else (s[k].gather(1, sort) for s in state)
            out = Recurrence.apply(x_proj, h0, c0, weight("weight_hh"), packing.batch_sizes, False)
            out = packing.mirror(out) if d else out
            outputs.append(out)
            h_n.append(packing.at(out, packing.first_index if d else packing.last_index))
        x = torch.cat(outputs, 2) if directions > 1 else outputs[0]
    return x, torch.stack(h_n)
