"""The building blocks of M independent models of one configuration, trained in one process (`train --seeds`).

The paper's protocol takes one episode per optimizer step, which leaves a CPU or GPU mostly idle: each LSTM
step multiplies about (40 x 200) by (200 x 800). Batching episodes inside one model would change the science,
so the parallelism goes across independent runs instead: every weight gets a leading model dimension M, model
m reads its own episode(s), and one step runs the forward and backward of all M models as batched products
(`bmm`), with the packed recurrence (trainer/lstm.py) stepping all M models at once. The models share nothing but the step:
each has its own weights, data order, dropout stream, Adam moments (Adam is element-wise) and gradient clip.

Layout: a stacked batch is an EpisodeBatch of M*B episodes, model-major (episodes m*B .. m*B+B-1 are model
m's). Packed sequences are (M, S, ...) in the layout of trainer.lstm.Packing: every model packs its own rows
time-major, all models share one step layout, and a model's shorter steps are padded at their end. Padded
positions hold zeros going in and are never read coming out, so their gradients are exactly zero. Empty rows
(padded queries or support items, length 0) take no step at all, so each model's valid tokens are exactly the
tokens, in the order, of a single model given the same episodes: dropout drawn per model over its valid tokens
draws the very masks that `train --seed m` draws.

A stack of one does not come here: trainer/model.py runs it through the single model's modules.
"""
from __future__ import annotations


import torch
from torch import nn

from trainer.lstm import Packing, Recurrence, gather_rows


# ---- dropout with one stream per model ------------------------------------------------------------------------

def stacked_dropout(x: torch.Tensor, p: float, training: bool, packing: Packing | None,
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
    return gather_rows(weight, tokens.reshape(M, -1)).view(tokens.shape + (weight.shape[2],))


def stacked_packed_lstm(lstm: nn.LSTM, x: torch.Tensor, packing: Packing,
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
