"""M independent models of the same configuration, trained in one process (`train --seeds`).

The paper's protocol takes one episode per optimizer step, which leaves a CPU or GPU mostly idle: each LSTM
step multiplies about (40 x 200) by (200 x 800). Batching episodes inside one model would change the science,
so the parallelism goes across independent runs instead: every weight gets a leading model dimension M, model
m reads its own episode(s), and one step runs the forward and backward of all M models as batched products
(`bmm`), with the packed recurrence stepping all M models at once. The models share nothing but the step:
each has its own weights, data order, dropout stream, Adam moments (Adam is element-wise) and gradient clip.

Layout: a stacked batch is an EpisodeBatch of M*B episodes, model-major (episodes m*B .. m*B+B-1 are model
m's). Packed sequences are (M, S, ...): every model packs its own rows time-major as trainer.lstm.Packing
does, and all models share one step layout (StackedPacking), padding a model's shorter steps at their end.
Padded positions hold zeros going in and are never read coming out, so their gradients are exactly zero.
Empty rows (padded queries or support items, length 0) take no step at all, so each model's valid tokens are
exactly the tokens, in the order, of a single model given the same episodes: dropout drawn per model over its
valid tokens draws the very masks that `train --seed m` draws.

The parameter names are those of MetaSeq2Seq (`model_state_dict(m)` is an ordinary checkpoint's "model").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.vocab import EOS_ID, PAD_ID, SOS_ID
from trainer.batch import EpisodeBatch
from trainer.lstm import Packing, cell_update_, packed_lstm
from trainer.model import (DecodeResult, MetaSeq2Seq, ModelConfig, attended_query_steps, masked_attention, output_mask,
                           with_output_mask)


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
        lengths = lengths.to(torch.long)
        M, N = lengths.shape
        if M == 1:
            lengths = lengths.clamp(min=1)
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


# ---- the recurrence -----------------------------------------------------------------------------------------

def _prev_positions(batch_sizes: list[int]) -> torch.Tensor:
    """(S,) for each packed position, the position of its previous state in cat([all states, h0], 1)."""
    sizes = torch.tensor(batch_sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    S = int(sizes.sum())
    step = torch.repeat_interleave(torch.arange(len(batch_sizes)), sizes)
    slot = torch.arange(S) - starts[step]
    return torch.where(step > 0, starts[(step - 1).clamp(min=0)] + slot, S + slot)


class _StackedRecurrence(torch.autograd.Function):
    """One forward-direction LSTM layer of M models over packed steps, given the input projections.

    x_proj (M, S, 4E) gates (i, f, g, o) without the recurrent term; h0, c0 (M, N, E) in sorted order;
    w_hh (M, 4E, E). Returns h (M, S, E). Every row starts at step 0 and the rows of step t are a prefix of
    those of step t - 1, so each step is one bmm over the prefix and a few in-place element-wise ops."""

    @staticmethod
    def forward(ctx, x_proj, h0, c0, w_hh, batch_sizes: list[int]):
        M, S, G = x_proj.shape
        E = G // 4
        gates, c_all = torch.empty_like(x_proj), x_proj.new_empty(M, S, E)
        h_all, tanh_c = torch.empty_like(c_all), torch.empty_like(c_all)
        w_t = w_hh.transpose(1, 2).contiguous()                             # (M, E, 4E)
        h_prev, c_prev, start = h0, c0, 0
        for n in batch_sizes:
            step = slice(start, start + n)
            g, c, tc, h = gates[:, step], c_all[:, step], tanh_c[:, step], h_all[:, step]
            torch.baddbmm(x_proj[:, step], h_prev[:, :n], w_t, out=g)
            cell_update_(g, c_prev[:, :n], c, tc, h)
            h_prev, c_prev, start = h, c, start + n
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(gates, c_all, tanh_c, h_all, h0, c0, w_hh)
        return h_all

    @staticmethod
    def backward(ctx, grad_h):
        gates, c_all, tanh_c, h_all, h0, c0, w_hh = ctx.saved_tensors
        batch_sizes = ctx.batch_sizes
        M, S, E = h_all.shape
        prev = _prev_positions(batch_sizes).to(h0.device)
        h_prev = torch.cat([h_all, h0], 1)[:, prev]                          # (M, S, E)
        c_prev = torch.cat([c_all, c0], 1)[:, prev]
        i, f, g, o = gates.split(E, 2)
        # Everything that does not depend on the recurrence, for all tokens at once.
        dc_per_dh = o * (1 - tanh_c * tanh_c)
        do_per_dh = tanh_c * o * (1 - o)
        difg_per_dc = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], 2)   # (M, S, 3, E)
        grad_h = grad_h.contiguous()
        grad_gates = h_all.new_empty(M, S, 4, E)
        grad_h0, grad_c0 = torch.zeros_like(h0), torch.zeros_like(c0)
        ends = torch.cumsum(torch.tensor(batch_sizes), 0).tolist()
        carry_h = carry_c = None
        for n, end in zip(reversed(batch_sizes), reversed(ends)):
            step = slice(end - n, end)
            dh = grad_h[:, step]
            if carry_h is None:
                dc = dh * dc_per_dh[:, step]
            else:
                if carry_h.shape[1] < n:
                    carry_h, carry_c = (F.pad(x, (0, 0, 0, n - x.shape[1])) for x in (carry_h, carry_c))
                dh = dh + carry_h
                dc = torch.addcmul(carry_c, dh, dc_per_dh[:, step])
            dg = grad_gates[:, step]                                        # (M, n, 4, E)
            torch.mul(dc.unsqueeze(2), difg_per_dc[:, step], out=dg[:, :, :3])
            torch.mul(dh, do_per_dh[:, step], out=dg[:, :, 3])
            carry_h = torch.bmm(dg.reshape(M, n, 4 * E), w_hh)
            carry_c = dc * f[:, step]
        n0 = batch_sizes[0] if batch_sizes else 0
        if carry_h is not None:
            grad_h0[:, :n0], grad_c0[:, :n0] = carry_h, carry_c
        grad_gates = grad_gates.view(M, S, 4 * E)
        grad_w_hh = torch.bmm(grad_gates.transpose(1, 2), h_prev)            # (M, 4E, E)
        return grad_gates, grad_h0, grad_c0, grad_w_hh, None


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


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (M, ..., in), weight (M, out, in), bias (M, out) -> (M, ..., out). A stack of one runs the single
    model's 2-D product (forward and backward), so that it computes the very numbers of a single run."""
    M = x.shape[0]
    if M == 1:
        return F.linear(x[0], weight[0], bias[0]).unsqueeze(0)
    out = _StackedLinear.apply(x.reshape(M, -1, x.shape[-1]), weight, bias)
    return out.view(x.shape[:-1] + (weight.shape[1],))


def _embed(weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """weight (M, V, E), tokens (M, ...) -> (M, ..., E); a stack of one as nn.Embedding (its backward sums alike)."""
    M = weight.shape[0]
    if M == 1:
        return F.embedding(tokens[0], weight[0]).unsqueeze(0)
    return _gather_rows(weight, tokens.reshape(M, -1)).view(tokens.shape + (weight.shape[2],))


def _right_pad(tokens: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(tokens, (0, length - tokens.shape[-1]), value=PAD_ID)


# ---- the model ----------------------------------------------------------------------------------------------

@dataclass
class _Encoded:
    context: torch.Tensor        # (M*B*nq, Tqi, E)
    context_mask: torch.Tensor   # (M*B*nq, Tqi) bool
    init: torch.Tensor           # (M, B*nq, E) decoder h0 = c0 on every layer


class StackedMetaSeq2Seq(nn.Module):
    """M MetaSeq2Seq models with stacked weights. `loss` returns the M losses; `greedy_decode` decodes each
    model's own episodes. Set `generators` (one torch.Generator per model) for per-model dropout streams."""

    def __init__(self, models: list[MetaSeq2Seq]):
        super().__init__()
        if not models:
            raise ValueError("a stack needs at least one model")
        self.cfg: ModelConfig = models[0].cfg
        if any(m.cfg != self.cfg for m in models):
            raise ValueError("every model of a stack has the same configuration")
        self.names = list(models[0].state_dict().keys())
        singles = [dict(m.named_parameters()) for m in models]
        # The single model's parameter order, so that optimizer states map index for index.
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([s[name].detach() for s in singles])) for name in self.names)
        self.index = {name: k for k, name in enumerate(self.names)}
        self.register_buffer("output_mask", output_mask(self.cfg), persistent=False)  # as MetaSeq2Seq's
        self.generators: list[torch.Generator] | None = None

    @property
    def num_models(self) -> int:
        return self.weights[0].shape[0]

    def w(self, name: str) -> torch.Tensor:
        return self.weights[self.index[name]]

    def model_state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Model m's weights under MetaSeq2Seq's names: an ordinary checkpoint's "model"."""
        return {name: p[m].detach().clone() for name, p in zip(self.names, self.weights)}

    def load_model_state_dict(self, m: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in zip(self.names, self.weights):
                p[m].copy_(state[name])

    # ---- building blocks ----------------------------------------------------------------------------------

    def _dropout(self, x: torch.Tensor, packing: StackedPacking | None) -> torch.Tensor:
        return stacked_dropout(x, self.cfg.dropout, self.training, packing, self.generators)

    def _lstm(self, prefix: str, x: torch.Tensor, packing: StackedPacking, bidirectional: bool,
              state: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """nn.LSTM `prefix` of every model over packed x (M, S, in). state (h0, c0), each (layers * dirs, M, N,
        E) in row order, zeros when None. Returns (last layer's output (M, S, dirs * E), h_n (layers * dirs,
        M, N, E)). The backward direction runs forward over each row mirrored."""
        if packing.single is not None and not x.is_cuda:
            return self._lstm_of_one(prefix, x, packing.single, bidirectional, state)
        directions, E, h_n = 1 + bidirectional, self.cfg.emb_size, []
        M, N = packing.nonempty.shape
        sort = packing.sorted_indices.unsqueeze(-1).expand(-1, -1, E)
        for layer in range(self.cfg.nlayers):
            if layer > 0:
                x = self._dropout(x, packing)
            outputs = []
            for d in range(directions):
                k, sfx = layer * directions + d, f"_l{layer}" + ("_reverse" if d else "")
                bias = self.w(f"{prefix}.bias_ih{sfx}") + self.w(f"{prefix}.bias_hh{sfx}")
                x_proj = _linear(packing.mirror(x) if d else x, self.w(f"{prefix}.weight_ih{sfx}"), bias)
                if state is None:
                    h0 = c0 = x.new_zeros(M, N, E)
                else:
                    h0, c0 = (s[k].gather(1, sort) for s in state)
                out = _StackedRecurrence.apply(x_proj, h0, c0, self.w(f"{prefix}.weight_hh{sfx}"),
                                               packing.batch_sizes)
                out = packing.mirror(out) if d else out
                outputs.append(out)
                h_n.append(packing.at(out, packing.first_index if d else packing.last_index))
            x = torch.cat(outputs, 2) if directions > 1 else outputs[0]
        return x, torch.stack(h_n)

    def _lstm_of_one(self, prefix: str, x: torch.Tensor, packing: Packing, bidirectional: bool,
                     state: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`_lstm` for a stack of one, through the single model's recurrence (2-D products, the backward
        direction run backward): the numbers of `train --seed`, bit for bit."""
        lstm = _OneLSTM(self, prefix, bidirectional)
        state = None if state is None else tuple(s[:, 0] for s in state)
        out, h_n = packed_lstm(lstm, x[0], packing, state, self.generators[0] if self.generators else None)
        return out.unsqueeze(0), h_n.unsqueeze(1)

    def _seq_encoder(self, prefix: str, tokens: torch.Tensor, packing: StackedPacking):
        """tokens (M, N, T) -> (steps (M, S, E), final (M, N, E)): directions summed, as SeqEncoder."""
        embedded = self._dropout(_embed(self.w(f"{prefix}.embedding.weight"), packing.pack(tokens)), packing)
        out, h_n = self._lstm(f"{prefix}.lstm", embedded, packing, bidirectional=True)
        E = self.cfg.emb_size
        return out[..., :E] + out[..., E:], h_n[-2] + h_n[-1]

    def _combine(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(_linear(torch.cat([a, b], -1), self.w(f"{name}.weight"), self.w(f"{name}.bias")))

    # ---- encoder ------------------------------------------------------------------------------------------

    def _encode(self, batch: EpisodeBatch) -> _Encoded:
        M = self.num_models
        MB, nq, Tqi = batch.query_in.shape
        B, device = MB // M, batch.query_in.device
        q_len = batch.query_in_len.reshape(-1).clamp(min=1)                   # (M*B*nq,)
        if self.cfg.disable_memory:
            lengths = batch.query_in_len.reshape(M, B * nq).cpu()
            packing = StackedPacking.from_lengths(lengths, Tqi, device)
            steps, final = self._seq_encoder("input_encoder", batch.query_in.reshape(M, B * nq, Tqi), packing)
            context = packing.unpack(steps).reshape(M * B * nq, Tqi, -1)
            return _Encoded(context, attended_query_steps(batch, self.cfg.mask_query_padding), final)
        ns = batch.support_in.shape[1]
        T = max(Tqi, batch.support_in.shape[2])
        tokens = torch.cat([_right_pad(batch.query_in, T).reshape(M, B * nq, T),
                            _right_pad(batch.support_in, T).reshape(M, B * ns, T)], 1)
        lengths = torch.cat([batch.query_in_len.reshape(M, -1), batch.support_in_len.reshape(M, -1),
                             batch.support_out_len.reshape(M, -1)], 1).cpu()
        packing = StackedPacking.from_lengths(lengths[:, :B * (nq + ns)], T, device)
        steps, final = self._seq_encoder("input_encoder", tokens, packing)
        q_steps = packing.unpack(steps)[:, :B * nq, :Tqi].reshape(M * B * nq, Tqi, -1)
        keys = final[:, B * nq:].reshape(M * B, ns, -1)
        out_tokens = batch.support_out.reshape(M, B * ns, -1)
        out_packing = StackedPacking.from_lengths(lengths[:, B * (nq + ns):], out_tokens.shape[2], device)
        _, values = self._seq_encoder("output_encoder", out_tokens, out_packing)
        mem, _ = masked_attention(q_steps.reshape(M * B, nq * Tqi, -1), keys, values.reshape(M * B, ns, -1),
                                  batch.support_mask)
        context = self._combine("memory_combine", q_steps.reshape(M, B * nq * Tqi, -1),
                                mem.reshape(M, B * nq * Tqi, -1)).view(M * B * nq, Tqi, -1)
        last = (q_len - 1).view(-1, 1, 1).expand(-1, 1, context.shape[-1])
        init = context.gather(1, last).view(M, B * nq, -1)
        return _Encoded(context, attended_query_steps(batch, self.cfg.mask_query_padding), init)

    def _initial_state(self, enc: _Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = enc.init.unsqueeze(0).expand(self.cfg.nlayers, -1, -1, -1)       # (nlayers, M, B*nq, E)
        return h0, h0

    # ---- training -----------------------------------------------------------------------------------------

    def loss(self, batch: EpisodeBatch) -> torch.Tensor:
        """(M,) each model's masked cross-entropy: token-mean within each episode, mean over its episodes."""
        M = self.num_models
        MB, nq, Tqo = batch.query_out.shape
        B = MB // M
        enc = self._encode(batch)
        target_len = batch.query_out_len.reshape(M, B * nq)
        packing = StackedPacking.from_lengths(target_len.cpu(), Tqo, batch.query_out.device)
        targets = batch.query_out.reshape(M, B * nq, Tqo)
        dec_in = torch.cat([torch.full_like(targets[..., :1], SOS_ID), targets[..., :-1]], 2)
        embedded = self._dropout(_embed(self.w("dec_embedding.weight"), packing.pack(dec_in)), packing)
        h, _ = self._lstm("dec_lstm", embedded, packing, False, self._initial_state(enc))   # (M, S, E)
        if not self.cfg.disable_attention:
            steps = packing.unpack(h).reshape(M * B * nq, Tqo, -1)
            ctx, _ = masked_attention(steps, enc.context, enc.context, enc.context_mask)
            h = self._combine("attn_combine", h, packing.pack(ctx.view(M, B * nq, Tqo, -1)))
        logits = self._logits(h)                                             # (M, S, V)
        token_loss = F.cross_entropy(logits.float().flatten(0, 1), packing.pack(targets).flatten(),  # as model.loss
                                     reduction="none", ignore_index=PAD_ID).view(M, -1)
        weighted = token_loss * self._token_weights(batch, packing)
        return weighted.sum().view(1) if M == 1 else weighted.sum(1)  # M = 1: the single model's reduction

    def _token_weights(self, batch: EpisodeBatch, packing: StackedPacking) -> torch.Tensor:
        """(M, S): 1 / (tokens in its episode * the model's episodes with tokens) at valid tokens, else 0."""
        M = self.num_models
        lengths = batch.query_out_len.reshape(M, -1, batch.query_out.shape[1])    # (M, B, nq)
        count = lengths.sum(2, keepdim=True)                                     # (M, B, 1)
        episodes = (count > 0).sum(1, keepdim=True).clamp(min=1)                 # (M, 1, 1)
        per_row = ((lengths > 0) / (count.clamp(min=1) * episodes)).reshape(M, -1).float()   # (M, B*nq)
        rows = (packing.flat_index // packing.width).clamp(max=packing.rows - 1)
        return per_row.gather(1, rows) * packing.valid

    # ---- decoding -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def greedy_decode(self, batch: EpisodeBatch, max_length: int) -> DecodeResult:
        """Greedy decoding of every model's episodes at once. Call eval() first. Rows keep stepping until
        every row has emitted EOS (a finished row's later tokens are discarded)."""
        if max_length < 1:
            raise ValueError("max_length must be >= 1")
        M = self.num_models
        MB, nq, Tqi = batch.query_in.shape
        enc = self._encode(batch)
        R = MB // M * nq
        h, c = (s.contiguous() for s in self._initial_state(enc))               # (nlayers, M, R, E)
        state = [(h[k], c[k]) for k in range(self.cfg.nlayers)]
        prev = torch.full((M, R), SOS_ID, dtype=torch.long, device=h.device)
        running = batch.query_mask.reshape(M, R)
        tokens = torch.full((M, R, max_length), PAD_ID, dtype=torch.long, device=h.device)
        lengths = torch.zeros(M, R, dtype=torch.long, device=h.device)
        steps = 0
        while steps < max_length and bool(running.any()):
            logits, state = self._decode_step(prev, state, enc)
            prev = logits.argmax(-1)                                          # (M, R)
            tokens[..., steps] = torch.where(running, prev, PAD_ID)
            lengths += running
            running = running & (prev != EOS_ID)
            steps += 1
        return DecodeResult(tokens[..., :steps].reshape(MB, nq, steps), lengths.view(MB, nq))

    def _decode_step(self, prev: torch.Tensor, state: list, enc: _Encoded):
        """One decoder step of every row: prev (M, R) -> logits (M, R, V), the new per-layer (h, c)."""
        x = _embed(self.w("dec_embedding.weight"), prev)                      # (M, R, E)
        new_state = []
        for layer, (h, c) in enumerate(state):
            sfx = f"_l{layer}"
            gates = (_linear(x, self.w("dec_lstm.weight_ih" + sfx), self.w("dec_lstm.bias_ih" + sfx))
                     + _linear(h, self.w("dec_lstm.weight_hh" + sfx), self.w("dec_lstm.bias_hh" + sfx)))
            i, f, g, o = gates.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            new_state.append((h, c))
            x = h
        if not self.cfg.disable_attention:
            M, R, E = x.shape
            ctx, _ = masked_attention(x.reshape(M * R, 1, E), enc.context, enc.context, enc.context_mask)
            x = self._combine("attn_combine", x, ctx.view(M, R, E))
        return self._logits(x), new_state

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return with_output_mask(_linear(h, self.w("out.weight"), self.w("out.bias")), self.output_mask)


class _OneLSTM:
    """Model 0 of a stack as the nn.LSTM `prefix`, for packed_lstm: its settings, and its weights by name."""

    def __init__(self, stack: StackedMetaSeq2Seq, prefix: str, bidirectional: bool):
        cfg = stack.cfg
        self.num_layers, self.hidden_size, self.bidirectional = cfg.nlayers, cfg.emb_size, bidirectional
        self.dropout, self.training = cfg.dropout if cfg.nlayers > 1 else 0.0, stack.training
        self._stack, self._prefix = stack, prefix

    def __getattr__(self, name: str) -> torch.Tensor:  # weight_ih_l0, bias_hh_l1_reverse, ...
        return self._stack.w(f"{self._prefix}.{name}")[0]


def stack_models(models: list[MetaSeq2Seq]) -> StackedMetaSeq2Seq:
    return StackedMetaSeq2Seq(models).to(next(models[0].parameters()).device)


def clip_grad_norms_(stacked: StackedMetaSeq2Seq, max_norm: float) -> torch.Tensor:
    """Clip each model's gradient to norm max_norm on its own norm (as clip_grad_norm_ does for one model);
    returns the M norms before clipping. A stack of one clips as a single run does."""
    grads = [p.grad for p in stacked.weights if p.grad is not None]
    M = stacked.num_models
    if M == 1:
        return torch.nn.utils.clip_grad_norm_(stacked.weights, max_norm).view(1)
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.view(M, -1), dim=1) for g in grads]),
                                     dim=0)                                                # (M,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view((M,) + (1,) * (g.dim() - 1)).to(g.dtype))
    return norms
