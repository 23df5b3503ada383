"""LSTMs over packed sequences that cost only their valid tokens, fast on the CPU.

The model's sequences (commands, action sequences) are short and of very different lengths, so padding
them to the longest one wastes most of an LSTM's work. PyTorch's CPU LSTM either runs padded (oneDNN), or,
given a PackedSequence, steps through a generic cell whose backward is many small autograd nodes; both are
slower than the recurrence below on the model's batches (docs/benchmarks.md has the measurements).
Here a layer is:

- one matrix product for the input projection of all valid tokens at once (autograd);
- a recurrence (`Recurrence`, an autograd Function) over the packed steps: per step, one product with
  W_hh on the rows still running and a few in-place element-wise ops; its backward is the same loop in
  reverse, and the W_hh gradient is one product over all tokens at the end.

The packing (`Packing`) and the recurrence serve M models at once (a stack, trainer/stacked.py); one
model is M = 1. `packed_lstm` runs one model's `nn.LSTM` over its packed tokens: its parameters are the
module's (same names and layout), so checkpoints do not change. On CUDA the packed nn.LSTM (cuDNN) is used
instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence


def gather_rows(data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """data (M, R, ...), index (M, K) long -> (M, K, ...): data[m, index[m, k]]."""
    rows = torch.arange(data.shape[0], device=data.device).unsqueeze(1)
    return data[rows, index]


@dataclass
class Packing:
    """How the (M, N) rows of width T of M models map to the packed layout (M, S, ...): per model, rows sorted
    longest first (stable) and packed time-major, the layout of pack_padded_sequence. All models share one
    step layout: step t holds n_t = the most rows any model still runs at t; a model with fewer has padding
    at the end of the step. In a stack rows of length 0 never run; one model runs them for one step."""
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

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, width: int, device) -> "Packing":
        """lengths (M, N) >= 0 on the CPU (the index arithmetic stays on the host)."""
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
        return cls([int(n) for n in sizes], to(sorted_indices), to(flat_index), to(valid), to(last_index),
                   to(unsorted), to(lengths > 0), to(reverse_index), to(model_of * len(step_of) + position),
                   valid.sum(1).tolist(), N, width)

    @property
    def size(self) -> int:
        return self.flat_index.shape[1]

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(M, N, T, ...) -> (M, S, ...), zeros (or PAD_ID) at padding."""
        M = padded.shape[0]
        flat = padded.reshape((M, self.rows * self.width) + padded.shape[3:])
        if M == 1:  # one model has no padding
            return flat[0][self.flat_index[0]].unsqueeze(0)
        flat = torch.cat([flat, flat.new_zeros((M, 1) + flat.shape[2:])], 1)
        return gather_rows(flat, self.flat_index)

    def unpack(self, data: torch.Tensor) -> torch.Tensor:
        """(M, S, ...) -> (M, N, T, ...), zero at padded steps."""
        M = data.shape[0]
        out = data.new_zeros((M, self.rows * self.width + 1) + data.shape[2:])
        rows = torch.arange(M, device=data.device).unsqueeze(1)
        out = out.index_put((rows, self.flat_index), data)
        return out[:, :-1].reshape((M, self.rows, self.width) + data.shape[2:])

    def mirror(self, data: torch.Tensor) -> torch.Tensor:
        """Each row's tokens in reverse order (an involution); padding stays in place."""
        return gather_rows(data, self.reverse_index)

    def at(self, data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """data (M, S, E) at per-row positions (M, N) -> (M, N, E), zero for empty rows."""
        return gather_rows(data, index) * self.nonempty.unsqueeze(-1).to(data.dtype)


def dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """F.dropout with the mask drawn by torch.rand (from `generator`, else the global one): the same
    Bernoulli(1 - p) keep mask and 1 / (1 - p) scale, but the CPU's bernoulli_ is slower than rand."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape, device=x.device, generator=generator).ge_(p).mul_(1.0 / (1.0 - p))
    return x * keep.to(x.dtype)


def packed_lstm(lstm: nn.LSTM, x: torch.Tensor, packing: Packing, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `lstm` (batch_first or not, any layers, uni- or bidirectional) over packed inputs of one model.

    x (total, input_size) in the layout of `packing` (of M = 1 model); state (h0, c0), each (layers * directions, N, E) in row
    order, zeros when None. Returns (output (total, directions * E) of the last layer, h_n (layers *
    directions, N, E) in row order), as nn.LSTM would for the same PackedSequence. On the CPU the dropout
    between layers draws from `generator` (else the global one), and `lstm` may be anything with nn.LSTM's
    attributes and weight names.
    """
    if x.is_cuda:
        return _cudnn_lstm(lstm, x, packing, state)
    return _cpu_lstm(lstm, x, packing, state, generator)


def lstm_steps(lstm: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
    """`lstm` (batch_first) over the padded steps x (R, T, E) from `state`, as nn.LSTM. Under CPU autocast it
    runs in fp32: oneDNN has no bf16 LSTM on some CPUs (AVX2-only ones), so every CPU gives the same numbers."""
    if x.is_cuda or not torch.is_autocast_enabled("cpu"):
        return lstm(x, state)
    with torch.autocast("cpu", enabled=False):
        return lstm(x.float(), tuple(s.float() for s in state))


def _cudnn_lstm(lstm: nn.LSTM, x, packing: Packing, state):
    batch_sizes = torch.tensor(packing.batch_sizes)
    packed = PackedSequence(x, batch_sizes, packing.sorted_indices[0], packing.first_index[0])
    out, (h_n, _) = lstm(packed, state)
    return out.data, h_n


@torch.compiler.disable  # a data-dependent Python loop: keep it out of torch.compile graphs
def _cpu_lstm(lstm: nn.LSTM, x, packing: Packing, state, generator: torch.Generator | None = None):
    directions = 2 if lstm.bidirectional else 1
    E, N = lstm.hidden_size, packing.rows
    if state is None:
        zeros = x.new_zeros(lstm.num_layers * directions, N, E)
        state = (zeros, zeros)
    h0, c0 = (s[:, packing.sorted_indices[0]] for s in state)                    # sorted order
    h_n = []
    for layer in range(lstm.num_layers):
        if layer > 0:  # nn.LSTM's dropout: on every layer's output but the last
            x = dropout(x, lstm.dropout, lstm.training, generator)
        outputs = []
        for d in range(directions):
            k = layer * directions + d
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(lstm, "weight_ih" + sfx), getattr(lstm, "weight_hh" + sfx)
            b_ih, b_hh = getattr(lstm, "bias_ih" + sfx), getattr(lstm, "bias_hh" + sfx)
            x_proj = F.linear(x, w_ih, b_ih + b_hh)                           # (total, 4E)
            out = Recurrence.apply(x_proj, h0[k], c0[k], w_hh, packing.batch_sizes, bool(d))
            outputs.append(out)
            # The state after each row's last step: at its last token going forward, at its first backward.
            h_n.append(out[packing.last_index[0]] if d == 0 else out[:N][packing.first_index[0]])
        x = torch.cat(outputs, 1) if directions > 1 else outputs[0]
    return x, torch.stack(h_n)


def _schedule(batch_sizes: list[int], reverse: bool) -> list[tuple[int, int, int]]:
    """(t, n, m) per step in the order the recurrence runs: step t has n rows, and its first m rows
    continue the previous step's first m rows (the others start from h0, c0). Going forward every row
    continues (m = n) but at the first step; going backward the rows of the later step continue and the
    rows whose last token is at t start."""
    order = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    schedule, prev_n = [], 0
    for t in order:
        n = batch_sizes[t]
        schedule.append((t, n, min(n, prev_n)))
        prev_n = n
    return schedule


def _prev_index(batch_sizes: list[int], reverse: bool) -> torch.Tensor:
    """(total,) for each token, the row of its previous state in cat([all states, initial states])."""
    sizes = torch.tensor(batch_sizes)
    total, T = int(sizes.sum()), len(batch_sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    prev = torch.arange(T) + (1 if reverse else -1)                         # the step that runs before t
    has_prev = (prev >= 0) & (prev < T)
    prev_start = torch.where(has_prev, starts[prev.clamp(0, T - 1)], 0)
    continuing = torch.where(has_prev, torch.minimum(sizes, sizes[prev.clamp(0, T - 1)]), 0)  # m per step
    step = torch.repeat_interleave(torch.arange(T), sizes)                 # (total,)
    row = torch.arange(total) - starts[step]
    return torch.where(row < continuing[step], prev_start[step] + row, total + row)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _no_autocast(device_type: str):
    """Autocast off inside the recurrence (entering the context costs more than a step when it is off)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def cell_update_(gates: torch.Tensor, c_prev: torch.Tensor, c: torch.Tensor, tanh_c: torch.Tensor,
                 h: torch.Tensor) -> None:
    """One LSTM step in place, given the pre-activation gates (..., 4E) in nn.LSTM's order (i, f, g, o): the
    gates are activated where they are, and c = f * c_prev + i * g, tanh_c = tanh(c), h = o * tanh_c are
    written into the given tensors (no allocation: at small batches that costs more than the arithmetic)."""
    E = c.shape[-1]
    i, f, cand, o = gates.split(E, -1)
    gates[..., :2 * E].sigmoid_()
    cand.tanh_()
    o.sigmoid_()
    torch.mul(f, c_prev, out=c)
    c.addcmul_(i, cand)
    torch.tanh(c, out=tanh_c)
    torch.mul(o, tanh_c, out=h)


def _recurrent_product(x: torch.Tensor, h: torch.Tensor, w_t: torch.Tensor, out: torch.Tensor, mm_dtype) -> None:
    """out = x + h @ w_t: x, out ([M,] n, 4E), h ([M,] n, E), w_t ([M,] E, 4E); under autocast the product runs
    in mm_dtype."""
    if mm_dtype != out.dtype:
        torch.add(x, torch.matmul(h.to(mm_dtype), w_t), out=out)
    elif x.dim() == 2:
        torch.addmm(x, h, w_t, out=out)
    else:
        torch.baddbmm(x, h, w_t, out=out)


class Recurrence(torch.autograd.Function):
    """One direction of one LSTM layer over packed steps, given the input projections: of one model, or of M
    models at once (every tensor then has a leading model dimension M).

    x_proj ([M,] S, 4E): the gates (i, f, g, o), nn.LSTM's order, without the recurrent term; h0, c0 ([M,] N, E)
    in sorted order; w_hh ([M,] 4E, E). Returns h ([M,] S, E). States and gates are float32 (or float64); under
    autocast the products with W_hh run in its low precision, as autocast runs nn.LSTM's. A stack of models
    shares one step layout, padded at the end of a model's shorter steps, and runs forward only (its backward
    direction is the forward one over mirrored rows). Per-step views come from one `split` per tensor: slicing
    in the loop would cost more than the arithmetic at small batches.
    """

    @staticmethod
    def forward(ctx, x_proj, h0, c0, w_hh, batch_sizes: list[int], reverse: bool):
        mm_dtype = _autocast_dtype(x_proj.device.type)
        with _no_autocast(x_proj.device.type):
            dtype = torch.promote_types(x_proj.dtype, torch.float32)         # bf16 -> float32
            x_proj, h0, c0, w_hh = (t.to(dtype) for t in (x_proj, h0, c0, w_hh))
            mm_dtype = mm_dtype or dtype
            gates = torch.empty_like(x_proj)                                  # activated (i, f, g, o)
            c_all = x_proj.new_empty(x_proj.shape[:-1] + h0.shape[-1:])
            h_all, tanh_c = torch.empty_like(c_all), torch.empty_like(c_all)
            xs, gs, cs, hs, tcs = (t.split(batch_sizes, -2) for t in (x_proj, gates, c_all, h_all, tanh_c))
            w_t = w_hh.transpose(-1, -2).to(mm_dtype)
            w_t = w_t.contiguous() if w_t.dim() == 3 else w_t
            h_prev, c_prev = h0.narrow(-2, 0, 0), c0.narrow(-2, 0, 0)
            for t, n, m in _schedule(batch_sizes, reverse):
                if m < n:  # rows m..n start here, from h0, c0
                    h_prev = torch.cat([h_prev.narrow(-2, 0, m), h0.narrow(-2, m, n - m)], -2)
                    c_prev = torch.cat([c_prev.narrow(-2, 0, m), c0.narrow(-2, m, n - m)], -2)
                _recurrent_product(xs[t], h_prev.narrow(-2, 0, n), w_t, gs[t], mm_dtype)
                cell_update_(gs[t], c_prev.narrow(-2, 0, n), cs[t], tcs[t], hs[t])
                h_prev, c_prev = hs[t], cs[t]
        ctx.batch_sizes, ctx.reverse, ctx.mm_dtype = batch_sizes, reverse, mm_dtype
        ctx.save_for_backward(gates, c_all, tanh_c, h_all, h0, c0, w_hh)
        return h_all

    @staticmethod
    def backward(ctx, grad_h):
        gates, c_all, tanh_c, h_all, h0, c0, w_hh = ctx.saved_tensors
        with _no_autocast(grad_h.device.type):
            grad_h = grad_h.to(h_all.dtype).contiguous()
            prev_index = _prev_index(ctx.batch_sizes, ctx.reverse).to(h0.device)
            h_prev = torch.cat([h_all, h0], -2).index_select(-2, prev_index)   # ([M,] S, E)
            c_prev = torch.cat([c_all, c0], -2).index_select(-2, prev_index)
            i, f, g, o = gates.split(h_all.shape[-1], -1)
            # Everything that does not depend on the recurrence, for all tokens at once.
            per_dh = (o * (1 - tanh_c * tanh_c), tanh_c * o * (1 - o))     # dc += dh * this; d(o) = dh * this
            difg_per_dc = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], -2)  # (.., S, 3, E)
            grad_gates, grad_h0, grad_c0 = _backward_steps(ctx, grad_h, f, per_dh, difg_per_dc, w_hh, h0, c0)
            w_mm = w_hh.to(ctx.mm_dtype)
            grad_w_hh = grad_gates.transpose(-1, -2).to(w_mm.dtype) @ h_prev.to(w_mm.dtype)   # ([M,] 4E, E)
        return grad_gates, grad_h0, grad_c0, grad_w_hh, None, None


def _backward_steps(ctx, grad_h, f, per_dh, difg_per_dc, w_hh, h0, c0):
    """The recurrence backward, step by step: the gradients of the pre-activation gates ([M,] S, 4E), h0, c0."""
    batch_sizes, w_mm = ctx.batch_sizes, w_hh.to(ctx.mm_dtype)
    E = grad_h.shape[-1]
    grad_gates = grad_h.new_empty(grad_h.shape[:-1] + (4, E))
    grad_h0, grad_c0 = torch.zeros_like(h0), torch.zeros_like(c0)
    dhs, fs, dc_dhs, do_dhs = (t.split(batch_sizes, -2) for t in (grad_h, f, *per_dh))
    dgs, difg_dcs = (t.split(batch_sizes, -3) for t in (grad_gates, difg_per_dc))        # ([M,] n, 4 or 3, E)
    carry_h = carry_c = None                                                 # into the step that ran before
    for t, n, m in reversed(_schedule(batch_sizes, ctx.reverse)):
        dh = dhs[t]
        if carry_h is None:
            dc = dh * dc_dhs[t]
        else:
            if carry_h.shape[-2] < n:
                carry_h, carry_c = (F.pad(x, (0, 0, 0, n - x.shape[-2])) for x in (carry_h, carry_c))
            dh = dh + carry_h
            dc = torch.addcmul(carry_c, dh, dc_dhs[t])
        dg = dgs[t]                                                           # ([M,] n, 4, E)
        torch.mul(dc.unsqueeze(-2), difg_dcs[t], out=dg[..., :3, :])
        torch.mul(dh, do_dhs[t], out=dg[..., 3, :])
        d_prev_h = (dg.flatten(-2).to(w_mm.dtype) @ w_mm).to(dc.dtype)
        d_prev_c = dc * fs[t]
        if m < n:  # rows m..n started from h0, c0
            grad_h0.narrow(-2, m, n - m).copy_(d_prev_h.narrow(-2, m, n - m))
            grad_c0.narrow(-2, m, n - m).copy_(d_prev_c.narrow(-2, m, n - m))
            d_prev_h, d_prev_c = d_prev_h.narrow(-2, 0, m), d_prev_c.narrow(-2, 0, m)
        carry_h, carry_c = d_prev_h, d_prev_c
    return grad_gates.flatten(-2), grad_h0, grad_c0
