"""The meta seq2seq model of Lake (2019), batched over B episodes.

An episode's support set is read into a key-value memory: keys are the final states of the support inputs,
values the final states of the support outputs. Every step of a query attends to its own episode's memory
only, and an attention decoder writes the query's output.

Layout: the B*nq queries of a batch are flattened to N rows in episode-major order, so row n belongs to
episode n // nq. Padded queries (length 0) stay in place as rows of length 1: a single encoder step is cheaper
than gathering and scattering the valid rows, and their outputs are masked everywhere (loss, decoding).

Cost: every LSTM (trainer/lstm.py), the decoder's output layers and the loss run on the valid tokens only,
packed time-major; a SCAN batch is about two thirds padding. Only the attention scores, a small share, are
computed on the padded grid, where they need the per-row layout.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.vocab import EOS_ID, PAD_ID, SOS_ID
from trainer.batch import EpisodeBatch
from trainer.lstm import Dropout, Packing, lstm_steps, packed_lstm

NUM_SPECIAL_TOKENS = 3  # PAD, SOS, EOS head every vocabulary


@dataclass
class ModelConfig:
    input_vocab_size: int
    output_vocab_size: int
    emb_size: int = 200          # E: embedding and hidden size
    nlayers: int = 2
    dropout: float = 0.5
    disable_memory: bool = False
    disable_attention: bool = False
    # Off, as the original: the decoder attention also covers the padded steps of the shorter queries of an
    # episode (up to the episode's longest query), where c_t = tanh(W [0; mean of the support values] + b),
    # per episode, whatever else shares the batch. On: each query attends over its own steps only.
    mask_query_padding: bool = False
    # The original's decoder has no <pad> class: off, the <pad> logit is -inf (probability 0, no gradient, never
    # decoded), so the softmax runs over the original's classes. On: <pad> is a class, as in our models before.
    pad_in_softmax: bool = False

    def __post_init__(self):
        if min(self.input_vocab_size, self.output_vocab_size) < NUM_SPECIAL_TOKENS:
            raise ValueError("vocabulary sizes must count the 3 special tokens")
        if self.emb_size < 1 or self.nlayers < 1:
            raise ValueError("emb_size and nlayers must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        # Unknown keys are an error: a checkpoint from another model version should not load silently.
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


@dataclass
class DecodeResult:
    tokens: torch.Tensor                           # (B, nq, L) long; PAD after EOS, EOS included when emitted
    lengths: torch.Tensor                          # (B, nq) long; up to and including EOS, 0 = padded query
    memory_attention: torch.Tensor | None = None   # (B, nq, Tqi, ns); None with disable_memory
    decoder_attention: torch.Tensor | None = None  # (B, nq, L, Tqi); None with disable_attention


def strip_decoded(result: DecodeResult) -> list[list[list[int]]]:
    """Per episode, per query: the decoded ids without the final EOS. Padded queries (length 0) are omitted;
    they only ever follow the real ones, so index q still names the episode's q-th query."""
    tokens, lengths = result.tokens.tolist(), result.lengths.tolist()
    out = []
    for ep_tokens, ep_lengths in zip(tokens, lengths):
        episode = []
        for seq, n in zip(ep_tokens, ep_lengths):
            if n == 0:
                continue
            seq = seq[:n]
            episode.append(seq[:-1] if seq[-1] == EOS_ID else seq)
        out.append(episode)
    return out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(E)) v over the keys where key_mask is True.

    q (R, Tq, E), k (R, Tk, E), v (R, Tk, Ev), key_mask (R, Tk) bool -> ((R, Tq, Ev), weights (R, Tq, Tk)).
    Masked keys get weight exactly 0; a row with no valid key gets all-zero weights and a zero result.
    """
    scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])  # (R, Tq, Tk)
    mask = key_mask.unsqueeze(1)                                          # (R, 1, Tk)
    # A finite fill (not -inf) keeps an all-masked row free of NaN; where() then zeroes it exactly.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.where(mask, torch.softmax(scores, dim=-1), 0.0)
    return torch.bmm(weights.to(v.dtype), v), weights


def attended_query_steps(batch: EpisodeBatch, mask_query_padding: bool) -> torch.Tensor:
    """(N, Tqi) bool: the query steps the decoder attends over, for the N = B*nq flattened queries. As the
    original: every step up to the longest valid query of its episode (a padded query counts as 1 step); with
    mask_query_padding, each query's own steps only."""
    B, nq, Tqi = batch.query_in.shape
    if mask_query_padding:
        lengths = batch.query_in_len.reshape(-1).clamp(min=1)
    else:
        lengths = (batch.query_in_len * batch.query_mask).amax(1).clamp(min=1).repeat_interleave(nq)
    return torch.arange(Tqi, device=lengths.device) < lengths.unsqueeze(1)


class SeqEncoder(nn.Module):
    """Embedding -> dropout -> bidirectional LSTM; the two directions are summed."""

    def __init__(self, vocab_size: int, emb_size: int, nlayers: int, dropout: float):
        super().__init__()
        self.emb_size = emb_size
        self.embedding = nn.Embedding(vocab_size, emb_size)
        self.dropout = Dropout(dropout)
        self.lstm = nn.LSTM(emb_size, emb_size, nlayers, batch_first=True, bidirectional=True,
                            dropout=dropout if nlayers > 1 else 0.0)

    def forward(self, tokens: torch.Tensor, packing: Packing,
                want_steps: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """tokens (N, T) -> (steps (total, E) in packing's layout, or None; final (N, E)).

        Only the valid tokens are embedded and run, and the backward direction starts at each sequence's
        last valid token. `final` is the last layer's h_n, forward + backward.
        """
        embedded = self.dropout(self.embedding(packing.pack(tokens)))       # (total, E)
        out, h_n = packed_lstm(self.lstm, embedded, packing)                # (total, 2E), (2*nlayers, N, E)
        final = h_n[-2] + h_n[-1]                                           # (N, E)
        if not want_steps:
            return None, final
        return out[:, :self.emb_size] + out[:, self.emb_size:], final


@dataclass
class _Encoded:
    """What the decoder needs about the N = B*nq flattened queries."""
    context: torch.Tensor                  # (N, Tqi, E): c_1..c_T (the decoder attends over these)
    context_mask: torch.Tensor             # (N, Tqi) bool: valid query steps
    init: torch.Tensor                     # (N, E): decoder h0 = c0 on every layer
    memory_attention: torch.Tensor | None  # (B, nq, Tqi, ns)


@dataclass
class _Lengths:
    """The batch's lengths on the CPU, where the packing arithmetic runs: one transfer per batch (the only
    host-device sync of a training step). 0 (padded item) is raised to 1: a padded row costs one step."""
    query_in: torch.Tensor     # (B*nq,)
    support_in: torch.Tensor   # (B*ns,)
    support_out: torch.Tensor  # (B*ns,)
    query_out: torch.Tensor    # (B*nq,) raw, 0 for padded queries

    @classmethod
    def of(cls, batch: EpisodeBatch) -> "_Lengths":
        parts = [batch.query_in_len, batch.support_in_len, batch.support_out_len, batch.query_out_len]
        flat = torch.cat([p.reshape(-1) for p in parts]).cpu()
        q_in, s_in, s_out, q_out = flat.split([p.numel() for p in parts])
        return cls(q_in.clamp(min=1), s_in.clamp(min=1), s_out.clamp(min=1), q_out)


def _token_weights(target_lengths: torch.Tensor) -> torch.Tensor:
    """(B, nq) target lengths (0 = padded query) -> (B*nq,) the loss weight of each token of each row:
    1 / (tokens in its episode * episodes with tokens), so the weighted sum is the mean over episodes of
    each episode's token-mean."""
    count = target_lengths.sum(1, keepdim=True)                            # (B, 1)
    episodes = (count > 0).sum().clamp(min=1)
    weights = (target_lengths > 0) / (count.clamp(min=1) * episodes)       # (B, nq)
    return weights.reshape(-1).float()


def output_mask(cfg: ModelConfig) -> torch.Tensor | None:
    """(V_out,) added to the output layer's logits: -inf at <pad> unless pad_in_softmax (then None)."""
    if cfg.pad_in_softmax:
        return None
    mask = torch.zeros(cfg.output_vocab_size)
    mask[PAD_ID] = float("-inf")
    return mask


def with_output_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return logits if mask is None else logits + mask


def _right_pad(tokens: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(tokens, (0, length - tokens.shape[-1]), value=PAD_ID)


class MetaSeq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.emb_size
        self.input_encoder = SeqEncoder(cfg.input_vocab_size, E, cfg.nlayers, cfg.dropout)
        if not cfg.disable_memory:
            self.output_encoder = SeqEncoder(cfg.output_vocab_size, E, cfg.nlayers, cfg.dropout)
            self.memory_combine = nn.Linear(2 * E, E)          # c_t = tanh(W [q_t; m_t])
        self.dec_embedding = nn.Embedding(cfg.output_vocab_size, E)
        self.dec_dropout = Dropout(cfg.dropout)
        self.dec_lstm = nn.LSTM(E, E, cfg.nlayers, batch_first=True,
                                dropout=cfg.dropout if cfg.nlayers > 1 else 0.0)
        if not cfg.disable_attention:
            self.attn_combine = nn.Linear(2 * E, E)            # tanh(W [h_t; ctx_t])
        self.out = nn.Linear(E, cfg.output_vocab_size)
        # Not in the state dict: it follows from the config, so checkpoints keep today's format.
        self.register_buffer("output_mask", output_mask(cfg), persistent=False)

    # ---- encoder -------------------------------------------------------------------------------------

    def _encode(self, batch: EpisodeBatch, lengths: _Lengths | None = None) -> _Encoded:
        lengths = _Lengths.of(batch) if lengths is None else lengths
        B, nq, Tqi = batch.query_in.shape
        device = batch.query_in.device
        q_len = batch.query_in_len.reshape(-1).clamp(min=1)                 # (N,) padded queries -> 1 step
        if self.cfg.disable_memory:
            packing = Packing.from_lengths(lengths.query_in, Tqi, device)
            steps, final = self.input_encoder(batch.query_in.reshape(B * nq, Tqi), packing)
            return _Encoded(packing.unpack(steps), attended_query_steps(batch, self.cfg.mask_query_padding), final, None)

        ns = batch.support_in.shape[1]
        # One call of the shared input encoder for the queries and the support inputs (fewer LSTM calls).
        T = max(Tqi, batch.support_in.shape[2])
        tokens = torch.cat([_right_pad(batch.query_in.reshape(B * nq, Tqi), T),
                            _right_pad(batch.support_in.reshape(B * ns, -1), T)])
        packing = Packing.from_lengths(torch.cat([lengths.query_in, lengths.support_in]), T, device)
        steps, final = self.input_encoder(tokens, packing)
        q_steps = packing.unpack(steps)[:B * nq, :Tqi]                      # (N, Tqi, E), 0 at padded steps
        keys = final[B * nq:].view(B, ns, -1)                               # (B, ns, E)
        out_tokens = batch.support_out.reshape(B * ns, -1)
        _, values = self.output_encoder(out_tokens, Packing.from_lengths(lengths.support_out, out_tokens.shape[1],
                                                                          device), want_steps=False)
        values = values.view(B, ns, -1)                                     # (B, ns, E)

        # Each episode attends to its own support items: its nq*Tqi query steps against its ns keys.
        mem, mem_attn = masked_attention(q_steps.reshape(B, nq * Tqi, -1), keys, values,
                                         batch.support_mask)                # (B, nq*Tqi, E), (B, nq*Tqi, ns)
        context = torch.tanh(self.memory_combine(torch.cat([q_steps, mem.view_as(q_steps)], -1)))
        last = (q_len - 1).view(-1, 1, 1).expand(-1, 1, context.shape[-1])
        init = context.gather(1, last).squeeze(1)                          # (N, E): last valid c_t
        return _Encoded(context, attended_query_steps(batch, self.cfg.mask_query_padding), init, mem_attn.view(B, nq, Tqi, ns))

    # ---- decoder -------------------------------------------------------------------------------------

    def initial_state(self, enc: _Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = enc.init.unsqueeze(0).expand(self.cfg.nlayers, -1, -1).contiguous()  # (nlayers, N, E)
        return h0, h0

    def decode(self, dec_in: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
               context: torch.Tensor, context_mask: torch.Tensor):
        """Decoder steps over dec_in (R, T) from `state`, attending over context (R, Tqi, E) where
        context_mask (R, Tqi) holds (greedy decoding runs it with T = 1).

        Returns logits (R, T, V_out), the new state, and the decoder attention (R, T, Tqi) or None.
        """
        embedded = self.dec_dropout(self.dec_embedding(dec_in))            # (R, T, E)
        h, state = lstm_steps(self.dec_lstm, embedded, state)               # (R, T, E)
        if self.cfg.disable_attention:
            return self.logits(h), state, None
        ctx, attn = masked_attention(h, context, context, context_mask)     # (R, T, E), (R, T, Tqi)
        return self.logits(self._combine(h, ctx)), state, attn

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer: (..., E) -> (..., V_out)."""
        return with_output_mask(self.out(h), self.output_mask)

    def _combine(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.attn_combine(torch.cat([h, ctx], -1)))     # tanh(W [h_t; ctx_t])

    def _teacher_forced(self, batch: EpisodeBatch) -> tuple[torch.Tensor, Packing, _Lengths]:
        """Teacher-forced logits (total, V_out) of the valid target tokens only, in the layout of the
        returned packing of the N = B*nq target rows; decoder input is SOS + query_out[..., :-1].

        The decoder LSTM, the output layers and the loss see only valid tokens: the attention result is
        not fed back into the LSTM, so it runs over whole packed targets at once (the same numbers as
        stepping). Only the attention scores (a small bmm) are computed on the padded (N, Tqo) grid.
        """
        B, nq, Tqo = batch.query_out.shape
        lengths = _Lengths.of(batch)
        enc = self._encode(batch, lengths)
        targets = batch.query_out.reshape(B * nq, Tqo)
        packing = Packing.from_lengths(lengths.query_out.clamp(min=1), Tqo, targets.device)
        dec_in = torch.cat([torch.full_like(targets[:, :1], SOS_ID), targets[:, :-1]], 1)
        embedded = self.dec_dropout(self.dec_embedding(packing.pack(dec_in)))  # (total, E)
        h, _ = packed_lstm(self.dec_lstm, embedded, packing, self.initial_state(enc))  # (total, E)
        if not self.cfg.disable_attention:
            ctx, _ = masked_attention(packing.unpack(h), enc.context, enc.context, enc.context_mask)
            h = self._combine(h, packing.pack(ctx))                        # (total, E)
        return self.logits(h), packing, lengths

    # ---- public API ----------------------------------------------------------------------------------

    def forward(self, batch: EpisodeBatch) -> torch.Tensor:
        """Teacher-forced logits (B, nq, Tqo, V_out); decoder input is SOS + query_out[..., :-1].
        Logits at padded target steps and padded queries are 0 (meaningless)."""
        B, nq, Tqo = batch.query_out.shape
        logits, packing, _ = self._teacher_forced(batch)
        return packing.unpack(logits).view(B, nq, Tqo, -1)

    def loss(self, batch: EpisodeBatch) -> torch.Tensor:
        """Masked cross-entropy over valid target tokens (EOS included): token-mean within each episode,
        then mean over episodes (so the gradient scale does not depend on B). Episodes without a single
        target token (pure padding) do not count in the mean."""
        B, nq, Tqo = batch.query_out.shape
        logits, packing, lengths = self._teacher_forced(batch)             # (total, V)
        targets = packing.pack(batch.query_out.reshape(B * nq, Tqo))        # (total,)
        # A padded query still has one packed step, whose target is <pad> and weight 0; ignore_index keeps its
        # loss at 0 rather than inf (<pad> has probability 0 without pad_in_softmax), which 0 * inf would make NaN.
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=PAD_ID)
        weights = _token_weights(lengths.query_out.view(B, nq)).to(logits.device, non_blocking=True)
        return (token_loss * weights[packing.token_rows]).sum()

    @torch.no_grad()
    def greedy_decode(self, batch: EpisodeBatch, max_length: int,
                      return_attention: bool = False) -> DecodeResult:
        """Greedy decoding of all valid queries at once. Decode under `evaluating(model)` (dropout is left as set).

        Rows that have emitted EOS are dropped from the running batch, so a step costs only what is still
        being decoded; it stops once every query has emitted EOS, or after max_length steps.
        memory_attention is None with disable_memory, decoder_attention None with disable_attention; both
        are 0 at padded query steps, padded queries and steps after EOS.
        """
        if max_length < 1:
            raise ValueError("max_length must be >= 1")
        B, nq, Tqi = batch.query_in.shape
        enc = self._encode(batch)
        rows = batch.query_mask.reshape(-1).nonzero().squeeze(1)           # (R,) running rows of N = B*nq
        context, context_mask = enc.context[rows], enc.context_mask[rows]   # (R, Tqi, E), (R, Tqi)
        state = tuple(s[:, rows] for s in self.initial_state(enc))          # 2 x (nlayers, R, E)
        prev = torch.full_like(rows, SOS_ID)                                # (R,)
        tokens = torch.full((B * nq, max_length), PAD_ID, dtype=torch.long, device=rows.device)
        lengths = torch.zeros(B * nq, dtype=torch.long, device=rows.device)
        attention = context.new_zeros(B * nq, max_length, Tqi) if return_attention else None
        steps = 0
        while steps < max_length and rows.numel() > 0:
            logits, state, attn = self.decode(prev.unsqueeze(1), state, context, context_mask)
            prev = logits[:, 0].argmax(-1)                                  # (R,)
            tokens[rows, steps] = prev
            lengths[rows] += 1
            if attention is not None and attn is not None:
                attention[rows, steps] = attn[:, 0].to(attention.dtype)
            steps += 1
            running = prev != EOS_ID
            if not bool(running.all()):  # one sync per step; drop the rows that are done
                rows, prev, context, context_mask = rows[running], prev[running], context[running], context_mask[running]
                state = tuple(s[:, running] for s in state)
        result = DecodeResult(tokens[:, :steps].view(B, nq, steps), lengths.view(B, nq))
        if return_attention:
            if enc.memory_attention is not None:
                result.memory_attention = enc.memory_attention * enc.context_mask.view(B, nq, Tqi, 1)
            if not self.cfg.disable_attention:
                result.decoder_attention = attention[:, :steps].reshape(B, nq, steps, Tqi)
        return result


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """`model` in eval mode (no dropout) inside the block, and back in the mode it had after it, error or not."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
