"""The meta seq2seq model of Lake (2019), batched over B episodes.

An episode's support set is read into a key-value memory: keys are the final states of the support inputs,
values the final states of the support outputs. Every step of a query attends to its own episode's memory
only, and an attention decoder writes the query's output.

Layout: the B*nq queries of a batch are flattened to N rows in episode-major order, so row n belongs to
episode n // nq. Padded queries (length 0) stay in place as rows of length 1: a single encoder step is cheaper
than gathering and scattering the valid rows, and their outputs are masked everywhere (loss, decoding).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.vocab import EOS_ID, PAD_ID, SOS_ID
from trainer.batch import EpisodeBatch

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
        # Unknown keys are an error: a checkpoint from another model version should not load silently.
        unknown = set(d) - {f.name for f in fields(cls)}
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


class SeqEncoder(nn.Module):
    """Embedding -> dropout -> bidirectional LSTM; the two directions are summed."""

    def __init__(self, vocab_size: int, emb_size: int, nlayers: int, dropout: float):
        super().__init__()
        self.emb_size = emb_size
        self.embedding = nn.Embedding(vocab_size, emb_size)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(emb_size, emb_size, nlayers, batch_first=True, bidirectional=True,
                            dropout=dropout if nlayers > 1 else 0.0)

    def forward(self, tokens: torch.Tensor, lengths_cpu: torch.Tensor,
                want_steps: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """tokens (N, T), lengths_cpu (N,) >= 1 on the CPU -> (steps (N, T, E) or None, final (N, E)).

        Packing makes the backward direction start at each sequence's last valid token; padded steps of
        `steps` are 0. `final` is the last layer's h_n, forward + backward.
        """
        embedded = self.dropout(self.embedding(tokens))                     # (N, T, E)
        packed = pack_padded_sequence(embedded, lengths_cpu, batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)                                   # h_n (2*nlayers, N, E)
        final = h_n[-2] + h_n[-1]                                           # (N, E)
        if not want_steps:
            return None, final
        steps, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])  # (N, T, 2E)
        return steps[..., :self.emb_size] + steps[..., self.emb_size:], final


@dataclass
class _Encoded:
    """What the decoder needs about the N = B*nq flattened queries."""
    context: torch.Tensor                  # (N, Tqi, E): c_1..c_T (the decoder attends over these)
    context_mask: torch.Tensor             # (N, Tqi) bool: valid query steps
    init: torch.Tensor                     # (N, E): decoder h0 = c0 on every layer
    memory_attention: torch.Tensor | None  # (B, nq, Tqi, ns)


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
        self.dec_dropout = nn.Dropout(cfg.dropout)
        self.dec_lstm = nn.LSTM(E, E, cfg.nlayers, batch_first=True,
                                dropout=cfg.dropout if cfg.nlayers > 1 else 0.0)
        if not cfg.disable_attention:
            self.attn_combine = nn.Linear(2 * E, E)            # tanh(W [h_t; ctx_t])
        self.out = nn.Linear(E, cfg.output_vocab_size)

    # ---- encoder -------------------------------------------------------------------------------------

    def _encode(self, batch: EpisodeBatch) -> _Encoded:
        B, nq, Tqi = batch.query_in.shape
        # pack_padded_sequence wants CPU lengths: one transfer for all of them (the only sync of a forward).
        q_len = batch.query_in_len.reshape(-1).clamp(min=1)                 # (N,) padded queries -> 1 step
        if self.cfg.disable_memory:
            steps, final = self.input_encoder(batch.query_in.reshape(B * nq, Tqi), q_len.cpu())
            return _Encoded(steps, self._step_mask(q_len, Tqi), final, None)

        ns = batch.support_in.shape[1]
        s_in_len = batch.support_in_len.reshape(-1).clamp(min=1)            # (B*ns,)
        s_out_len = batch.support_out_len.reshape(-1).clamp(min=1)
        lengths_cpu = torch.cat([q_len, s_in_len, s_out_len]).cpu()
        # One call of the shared input encoder for the queries and the support inputs (fewer LSTM calls).
        T = max(Tqi, batch.support_in.shape[2])
        tokens = torch.cat([_right_pad(batch.query_in.reshape(B * nq, Tqi), T),
                            _right_pad(batch.support_in.reshape(B * ns, -1), T)])
        steps, final = self.input_encoder(tokens, lengths_cpu[:B * nq + B * ns])
        q_steps = steps[:B * nq, :Tqi]                                      # (N, Tqi, E)
        keys = final[B * nq:].view(B, ns, -1)                               # (B, ns, E)
        _, values = self.output_encoder(batch.support_out.reshape(B * ns, -1),
                                        lengths_cpu[B * nq + B * ns:], want_steps=False)
        values = values.view(B, ns, -1)                                     # (B, ns, E)

        # Each episode attends to its own support items: its nq*Tqi query steps against its ns keys.
        mem, mem_attn = masked_attention(q_steps.reshape(B, nq * Tqi, -1), keys, values,
                                         batch.support_mask)                # (B, nq*Tqi, E), (B, nq*Tqi, ns)
        context = torch.tanh(self.memory_combine(torch.cat([q_steps, mem.view_as(q_steps)], -1)))
        last = (q_len - 1).view(-1, 1, 1).expand(-1, 1, context.shape[-1])
        init = context.gather(1, last).squeeze(1)                          # (N, E): last valid c_t
        return _Encoded(context, self._step_mask(q_len, Tqi), init, mem_attn.view(B, nq, Tqi, ns))

    @staticmethod
    def _step_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
        return torch.arange(T, device=lengths.device) < lengths.unsqueeze(1)   # (N, T) bool

    # ---- decoder -------------------------------------------------------------------------------------

    def initial_state(self, enc: _Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = enc.init.unsqueeze(0).expand(self.cfg.nlayers, -1, -1).contiguous()  # (nlayers, N, E)
        return h0, h0

    def decode(self, dec_in: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
               context: torch.Tensor, context_mask: torch.Tensor):
        """Run the decoder over dec_in (R, T) from `state`, attending over context (R, Tqi, E) where
        context_mask (R, Tqi) holds. T is the whole target under teacher forcing, or 1 per greedy step:
        the attention output is not fed back into the LSTM, so both give the same numbers.

        Returns logits (R, T, V_out), the new state, and the decoder attention (R, T, Tqi) or None.
        """
        embedded = self.dec_dropout(self.dec_embedding(dec_in))            # (R, T, E)
        h, state = self.dec_lstm(embedded, state)                           # (R, T, E)
        if self.cfg.disable_attention:
            return self.out(h), state, None
        ctx, attn = masked_attention(h, context, context, context_mask)     # (R, T, E), (R, T, Tqi)
        hidden = torch.tanh(self.attn_combine(torch.cat([h, ctx], -1)))    # (R, T, E)
        return self.out(hidden), state, attn

    # ---- public API ----------------------------------------------------------------------------------

    def forward(self, batch: EpisodeBatch) -> torch.Tensor:
        """Teacher-forced logits (B, nq, Tqo, V_out); decoder input is SOS + query_out[..., :-1].
        Logits at padded target steps and padded queries are meaningless."""
        B, nq, Tqo = batch.query_out.shape
        enc = self._encode(batch)
        targets = batch.query_out.reshape(B * nq, Tqo)
        # A plain padded LSTM call suffices: padding only follows the valid steps of a forward LSTM.
        sos = torch.full_like(targets[:, :1], SOS_ID)
        logits, _, _ = self.decode(torch.cat([sos, targets[:, :-1]], 1), self.initial_state(enc),
                                   enc.context, enc.context_mask)
        return logits.view(B, nq, Tqo, -1)

    def loss(self, batch: EpisodeBatch) -> torch.Tensor:
        """Masked cross-entropy over valid target tokens (EOS included): token-mean within each episode,
        then mean over episodes (so the gradient scale does not depend on B)."""
        logits = self(batch)                                                # (B, nq, Tqo, V)
        B, nq, Tqo, V = logits.shape
        token_loss = F.cross_entropy(logits.reshape(-1, V).float(), batch.query_out.reshape(-1),
                                     reduction="none").view(B, nq * Tqo)
        steps = torch.arange(Tqo, device=logits.device)
        valid = (steps < batch.query_out_len.unsqueeze(-1)).view(B, nq * Tqo)   # (B, nq*Tqo)
        count = valid.sum(1)                                                # (B,)
        per_episode = torch.where(valid, token_loss, 0.0).sum(1) / count.clamp(min=1)
        # Episodes without a single target token (pure padding) do not count in the mean.
        has_tokens = count > 0
        return (per_episode * has_tokens).sum() / has_tokens.sum().clamp(min=1)

    @torch.no_grad()
    def greedy_decode(self, batch: EpisodeBatch, max_length: int,
                      return_attention: bool = False) -> DecodeResult:
        """Greedy decoding of all valid queries at once. Call model.eval() first (dropout is left as set).

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
