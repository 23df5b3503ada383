"""The meta seq2seq model of Lake (2019): M independent models (a run is M = 1), each batched over B episodes.

An episode's support set is read into a key-value memory: keys are the final states of the support inputs,
values the final states of the support outputs. Every step of a query attends to its own episode's memory
only, and an attention decoder writes the query's output.

Layout: a batch holds M*B episodes, model-major (episodes m*B .. m*B+B-1 are model m's); the B*nq queries of
a model are flattened to N rows in episode-major order. Every LSTM, the decoder's output layers and the loss
run on the valid tokens only, packed time-major (trainer/lstm.py); a SCAN batch is about two thirds padding.
Only the attention scores, a small share, are computed on the padded grid.

One model (M = 1) keeps its weights in ordinary modules (nn.LSTM, nn.Linear, ...) and runs them as such: 2-D
products, the packed recurrence of trainer/lstm.py, cuDNN on CUDA. `stack_models` gives every weight a
leading model dimension and runs the M models as batched products (trainer/stacked.py). The parameter names
are the same either way, and `model_state_dict(m)` is model m's ordinary checkpoint weights.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.vocab import EOS_ID, PAD_ID, SOS_ID
from trainer.batch import EpisodeBatch
from trainer.lstm import Packing, dropout, lstm_steps, packed_lstm
from trainer.stacked import stacked_dropout, stacked_embedding, stacked_linear, stacked_packed_lstm

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
    """B counts the episodes of every model: M*B, model-major."""
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
    """The weights of an encoder: embedding -> dropout -> bidirectional LSTM, the two directions summed
    (MetaSeq2Seq._seq_encoder runs it)."""

    def __init__(self, vocab_size: int, emb_size: int, nlayers: int, dropout: float):
        super().__init__()
        self.emb_size = emb_size
        self.embedding = nn.Embedding(vocab_size, emb_size)
        self.lstm = nn.LSTM(emb_size, emb_size, nlayers, batch_first=True, bidirectional=True,
                            dropout=dropout if nlayers > 1 else 0.0)


@dataclass
class _Encoded:
    """What the decoder needs about the M*N flattened queries (N = B*nq per model)."""
    context: torch.Tensor                  # (M*N, Tqi, E): c_1..c_T (the decoder attends over these)
    context_mask: torch.Tensor             # (M*N, Tqi) bool: the query steps attended over
    init: torch.Tensor                     # (M, N, E): decoder h0 = c0 on every layer
    memory_attention: torch.Tensor | None  # (M*B, nq, Tqi, ns)


def _token_weights(target_lengths: torch.Tensor, M: int) -> torch.Tensor:
    """(M*B, nq) target lengths (0 = padded query) -> (M, B*nq): the loss weight of each token of each row,
    1 / (tokens in its episode * the model's episodes with tokens), so that a model's weighted sum is the mean
    over its episodes of each episode's token-mean."""
    lengths = target_lengths.view(M, -1, target_lengths.shape[1])           # (M, B, nq)
    count = lengths.sum(2, keepdim=True)                                    # (M, B, 1)
    episodes = (count > 0).sum(1, keepdim=True).clamp(min=1)                # (M, 1, 1)
    return ((lengths > 0) / (count.clamp(min=1) * episodes)).reshape(M, -1).float()


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
        self.dec_lstm = nn.LSTM(E, E, cfg.nlayers, batch_first=True,
                                dropout=cfg.dropout if cfg.nlayers > 1 else 0.0)
        if not cfg.disable_attention:
            self.attn_combine = nn.Linear(2 * E, E)            # tanh(W [h_t; ctx_t])
        self.out = nn.Linear(E, cfg.output_vocab_size)
        # Not in the state dict: it follows from the config, so checkpoints keep today's format.
        self.register_buffer("output_mask", output_mask(cfg), persistent=False)
        self.num_models = 1  # M; stack_models makes more
        # Per-model dropout streams (a stack's); None draws from the global generator, as a single run does.
        self.generators: list[torch.Generator] | None = None

    def model_state_dict(self, m: int = 0) -> dict[str, torch.Tensor]:
        """Model m's weights under the single model's names and shapes: an ordinary checkpoint's "model"."""
        return {name: model_slice(p, m, self.num_models).detach().clone() for name, p in self.state_dict().items()}

    # ---- building blocks: M = 1 runs the modules themselves, M > 1 their stacked weights --------------

    def _generator(self, m: int) -> torch.Generator | None:
        return self.generators[m] if self.generators else None

    def _linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """x (M, ..., in) -> (M, ..., out)."""
        if self.num_models == 1:
            return layer(x[0]).unsqueeze(0)
        return stacked_linear(x, layer.weight, layer.bias)

    def _embed(self, embedding: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (M, ...) -> (M, ..., E)."""
        if self.num_models == 1:
            return embedding(tokens[0]).unsqueeze(0)
        return stacked_embedding(embedding.weight, tokens)

    def _dropout(self, x: torch.Tensor, packing: Packing | None) -> torch.Tensor:
        """x (M, S, F); a stack draws model m's mask over its valid tokens only, from its own generator."""
        if self.num_models == 1:
            return dropout(x[0], self.cfg.dropout, self.training, self._generator(0)).unsqueeze(0)
        return stacked_dropout(x, self.cfg.dropout, self.training, packing, self.generators)

    def _lstm(self, lstm: nn.LSTM, x: torch.Tensor, packing: Packing,
              state: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """packed x (M, S, in), state (h0, c0) each (layers * dirs, M, N, E) in row order or None (zeros) ->
        (the last layer's output (M, S, dirs * E), h_n (layers * dirs, M, N, E))."""
        if self.num_models > 1:
            return stacked_packed_lstm(lstm, x, packing, state, self.generators)
        state = None if state is None else tuple(s[:, 0].contiguous() for s in state)
        out, h_n = packed_lstm(lstm, x[0], packing, state, self._generator(0))
        return out.unsqueeze(0), h_n.unsqueeze(1)

    def _seq_encoder(self, encoder: SeqEncoder, tokens: torch.Tensor, packing: Packing):
        """tokens (M, N, T) -> (steps (M, S, E) in packing's layout, final (M, N, E)), forward + backward.
        Only the valid tokens are embedded and run; the backward direction starts at each row's last token."""
        embedded = self._dropout(self._embed(encoder.embedding, packing.pack(tokens)), packing)
        out, h_n = self._lstm(encoder.lstm, embedded, packing)
        E = self.cfg.emb_size
        return out[..., :E] + out[..., E:], h_n[-2] + h_n[-1]

    def _combine(self, layer: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self._linear(layer, torch.cat([a, b], -1)))      # tanh(W [a; b])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer: (M, ..., E) -> (M, ..., V_out)."""
        return with_output_mask(self._linear(self.out, h), self.output_mask)

    # ---- encoder ------------------------------------------------------------------------------------------

    def _encode(self, batch: EpisodeBatch) -> _Encoded:
        M = self.num_models
        MB, nq, Tqi = batch.query_in.shape
        B, device = MB // M, batch.query_in.device
        attended = attended_query_steps(batch, self.cfg.mask_query_padding)
        if self.cfg.disable_memory:
            packing = Packing.from_lengths(batch.query_in_len.reshape(M, B * nq).cpu(), Tqi, device)
            steps, final = self._seq_encoder(self.input_encoder, batch.query_in.reshape(M, B * nq, Tqi), packing)
            return _Encoded(packing.unpack(steps).reshape(MB * nq, Tqi, -1), attended, final, None)
        q_steps, keys, values = self._read_support(batch)
        # Each episode attends to its own support items: its nq*Tqi query steps against its ns keys.
        mem, mem_attn = masked_attention(q_steps.reshape(MB, nq * Tqi, -1), keys, values, batch.support_mask)
        context = self._combine(self.memory_combine, q_steps.reshape(M, B * nq * Tqi, -1),
                                mem.reshape(M, B * nq * Tqi, -1)).view(MB * nq, Tqi, -1)
        last = (batch.query_in_len.reshape(-1).clamp(min=1) - 1).view(-1, 1, 1).expand(-1, 1, context.shape[-1])
        init = context.gather(1, last).view(M, B * nq, -1)                 # the last valid c_t of each query
        return _Encoded(context, attended, init, mem_attn.view(MB, nq, Tqi, -1))

    def _read_support(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries' steps (M*B*nq, Tqi, E), and the memory's keys and values (M*B, ns, E). One call of the
        shared input encoder runs the queries and the support inputs (fewer LSTM calls)."""
        M = self.num_models
        MB, nq, Tqi = batch.query_in.shape
        B, ns, device = MB // M, batch.support_in.shape[1], batch.query_in.device
        T = max(Tqi, batch.support_in.shape[2])
        tokens = torch.cat([_right_pad(batch.query_in, T).reshape(M, B * nq, T),
                            _right_pad(batch.support_in, T).reshape(M, B * ns, T)], 1)
        lengths = torch.cat([batch.query_in_len.reshape(M, -1), batch.support_in_len.reshape(M, -1),
                             batch.support_out_len.reshape(M, -1)], 1).cpu()  # one transfer
        packing = Packing.from_lengths(lengths[:, :B * (nq + ns)], T, device)
        steps, final = self._seq_encoder(self.input_encoder, tokens, packing)
        q_steps = packing.unpack(steps)[:, :B * nq, :Tqi].reshape(MB * nq, Tqi, -1)   # 0 at padded steps
        out_tokens = batch.support_out.reshape(M, B * ns, -1)
        out_packing = Packing.from_lengths(lengths[:, B * (nq + ns):], out_tokens.shape[2], device)
        _, values = self._seq_encoder(self.output_encoder, out_tokens, out_packing)
        return q_steps, final[:, B * nq:].reshape(MB, ns, -1), values.reshape(MB, ns, -1)

    def _initial_state(self, enc: _Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = enc.init.unsqueeze(0).expand(self.cfg.nlayers, -1, -1, -1)      # (nlayers, M, N, E)
        return h0, h0

    # ---- training -----------------------------------------------------------------------------------------

    def _teacher_forced(self, batch: EpisodeBatch) -> tuple[torch.Tensor, Packing]:
        """Teacher-forced logits (M, S, V_out) of the valid target tokens only, in the layout of the returned
        packing of each model's N = B*nq target rows; the decoder input is SOS + query_out[..., :-1].

        The attention result is not fed back into the LSTM, so the decoder runs over whole packed targets at
        once (the same numbers as stepping); only the attention scores are computed on the padded grid."""
        M = self.num_models
        MB, nq, Tqo = batch.query_out.shape
        enc = self._encode(batch)
        targets = batch.query_out.reshape(M, MB // M * nq, Tqo)
        packing = Packing.from_lengths(batch.query_out_len.reshape(M, -1).cpu(), Tqo, targets.device)
        dec_in = torch.cat([torch.full_like(targets[..., :1], SOS_ID), targets[..., :-1]], 2)
        embedded = self._dropout(self._embed(self.dec_embedding, packing.pack(dec_in)), packing)
        h, _ = self._lstm(self.dec_lstm, embedded, packing, self._initial_state(enc))   # (M, S, E)
        if not self.cfg.disable_attention:
            steps = packing.unpack(h).reshape(MB * nq, Tqo, -1)
            ctx, _ = masked_attention(steps, enc.context, enc.context, enc.context_mask)
            h = self._combine(self.attn_combine, h, packing.pack(ctx.view(M, -1, Tqo, ctx.shape[-1])))
        return self._logits(h), packing

    def forward(self, batch: EpisodeBatch) -> torch.Tensor:
        """Teacher-forced logits (M*B, nq, Tqo, V_out); decoder input is SOS + query_out[..., :-1].
        Logits at padded target steps and padded queries are 0 (meaningless)."""
        MB, nq, Tqo = batch.query_out.shape
        logits, packing = self._teacher_forced(batch)
        return packing.unpack(logits).reshape(MB, nq, Tqo, -1)

    def loss(self, batch: EpisodeBatch) -> torch.Tensor:
        """(M,) each model's masked cross-entropy over valid target tokens (EOS included): token-mean within
        each episode, then mean over its episodes (so the gradient scale does not depend on B). Episodes
        without a single target token (pure padding) do not count in the mean."""
        M = self.num_models
        logits, packing = self._teacher_forced(batch)                      # (M, S, V)
        targets = packing.pack(batch.query_out.reshape(M, -1, batch.query_out.shape[2]))   # (M, S)
        # A padded query still has one packed step, whose target is <pad> and weight 0; ignore_index keeps its
        # loss at 0 rather than inf (<pad> has probability 0 without pad_in_softmax), which 0 * inf would make NaN.
        token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                                     ignore_index=PAD_ID).view(M, -1)
        rows = (packing.flat_index // packing.width).clamp(max=packing.rows - 1)
        weights = _token_weights(batch.query_out_len, M).gather(1, rows) * packing.valid
        weighted = token_loss * weights
        return weighted.sum().view(1) if M == 1 else weighted.sum(1)

    # ---- decoding -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def greedy_decode(self, batch: EpisodeBatch, max_length: int, return_attention: bool = False) -> DecodeResult:
        """Greedy decoding of every model's valid queries at once. Decode under `evaluating(model)` (dropout
        is left as set). A row leaves the running batch once every model has emitted EOS in it, so a step
        costs only what is still being decoded; it stops when no row runs, or after max_length steps.
        memory_attention is None with disable_memory, decoder_attention None with disable_attention; both are
        0 at padded query steps, padded queries and steps after EOS."""
        if max_length < 1:
            raise ValueError("max_length must be >= 1")
        M = self.num_models
        MB, nq, Tqi = batch.query_in.shape
        enc = self._encode(batch)
        out = _Decoding(M, MB // M * nq, max_length, Tqi, return_attention and not self.cfg.disable_attention,
                        batch.query_in.device, enc.context.dtype)
        steps = self._decode_steps(enc, batch.query_mask.reshape(M, -1), out, max_length)
        result = DecodeResult(out.tokens[..., :steps].reshape(MB, nq, steps), out.lengths.view(MB, nq))
        if return_attention and enc.memory_attention is not None:
            result.memory_attention = enc.memory_attention * enc.context_mask.view(MB, nq, Tqi, 1)
        if out.attention is not None:
            result.decoder_attention = out.attention[:, :, :steps].reshape(MB, nq, steps, Tqi)
        return result

    def _decode_steps(self, enc: _Encoded, running: torch.Tensor, out: "_Decoding", max_length: int) -> int:
        """Greedy steps from SOS for the (M, R) running rows; writes into `out`, returns the steps taken."""
        M, R = running.shape
        rows = running.any(0).nonzero().squeeze(1)                         # (r,) rows some model decodes
        running = running[:, rows]                                          # (M, r)
        context = enc.context.view(M, R, *enc.context.shape[1:])[:, rows]   # (M, r, Tqi, E)
        mask = enc.context_mask.view(M, R, -1)[:, rows]                     # (M, r, Tqi)
        state = tuple(s[:, :, rows] for s in self._initial_state(enc))      # 2 x (nlayers, M, r, E)
        prev = torch.full((M, rows.numel()), SOS_ID, dtype=torch.long, device=rows.device)
        steps = 0
        while steps < max_length and rows.numel() > 0:
            logits, state, attn = self._decode_step(prev, state, context.flatten(0, 1), mask.flatten(0, 1))
            prev = logits.argmax(-1)                                        # (M, r)
            out.write(rows, steps, running, prev, attn)
            steps += 1
            running = running & (prev != EOS_ID)
            keep = running.any(0)
            if not bool(keep.all()):  # one sync per step; drop the rows that every model has finished
                rows = rows[keep]
                prev, running, context, mask = (t[:, keep] for t in (prev, running, context, mask))
                state = tuple(s[:, :, keep] for s in state)
        return steps

    def _decode_step(self, prev: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor,
                     context_mask: torch.Tensor):
        """One decoder step of the running rows: prev (M, r) -> logits (M, r, V), the new state, and the decoder
        attention (M, r, Tqi) or None; context (M*r, Tqi, E) and context_mask (M*r, Tqi)."""
        x = self._dropout(self._embed(self.dec_embedding, prev), None)     # (M, r, E)
        h, state = self._decoder_lstm_step(x, state)
        if self.cfg.disable_attention:
            return self._logits(h), state, None
        M, r, E = h.shape
        ctx, attn = masked_attention(h.reshape(M * r, 1, E), context, context, context_mask)
        return self._logits(self._combine(self.attn_combine, h, ctx.view(M, r, E))), state, attn.view(M, r, -1)

    def _decoder_lstm_step(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """x (M, r, E), state (h, c) each (nlayers, M, r, E) -> (the last layer's h (M, r, E), the new state)."""
        h, c = state
        if self.num_models == 1:
            out, (h, c) = lstm_steps(self.dec_lstm, x[0].unsqueeze(1), (h[:, 0], c[:, 0]))
            return out[:, 0].unsqueeze(0), (h.unsqueeze(1), c.unsqueeze(1))
        hs, cs = [], []
        for layer in range(self.cfg.nlayers):
            weight = lambda name: getattr(self.dec_lstm, f"{name}_l{layer}")  # noqa: E731
            gates = (stacked_linear(x, weight("weight_ih"), weight("bias_ih"))
                     + stacked_linear(h[layer], weight("weight_hh"), weight("bias_hh")))
            i, f, g, o = gates.chunk(4, -1)
            cs.append(torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g))
            hs.append(torch.sigmoid(o) * torch.tanh(cs[-1]))
            x = hs[-1]
        return x, (torch.stack(hs), torch.stack(cs))


class _Decoding:
    """What greedy decoding writes, for the M models' R rows: tokens, lengths and the decoder attention."""

    def __init__(self, M: int, R: int, max_length: int, Tqi: int, attention: bool, device, dtype):
        self.tokens = torch.full((M, R, max_length), PAD_ID, dtype=torch.long, device=device)
        self.lengths = torch.zeros(M, R, dtype=torch.long, device=device)
        self.attention = torch.zeros(M, R, max_length, Tqi, dtype=dtype, device=device) if attention else None

    def write(self, rows: torch.Tensor, step: int, running: torch.Tensor, tokens: torch.Tensor,
              attention: torch.Tensor | None) -> None:
        """Step `step` of the rows `rows`, where `running` (M, r) holds (a finished row's tokens are dropped)."""
        self.tokens[:, rows, step] = torch.where(running, tokens, PAD_ID)
        self.lengths[:, rows] += running
        if self.attention is not None and attention is not None:
            self.attention[:, rows, step] = attention.to(self.attention.dtype) * running.unsqueeze(-1)


def stack_weights(tensors: list[torch.Tensor]) -> torch.Tensor:
    """M models' tensors of one weight (or of its Adam moments) as a stack holds them: on a leading model
    dimension, or, for one model, the tensor itself."""
    return torch.stack(tensors) if len(tensors) > 1 else tensors[0]


def model_slice(stacked: torch.Tensor, m: int, num_models: int) -> torch.Tensor:
    """Model m's part of a tensor that stack_weights made."""
    return stacked[m] if num_models > 1 else stacked


def stack_models(models: list[MetaSeq2Seq]) -> MetaSeq2Seq:
    """One model of M = len(models) independent models of the same configuration: every weight is the stack
    of theirs (model m at index m), on the first model's device. A stack of one is a copy of the model."""
    if not models:
        raise ValueError("a stack needs at least one model")
    if any(m.cfg != models[0].cfg for m in models):
        raise ValueError("every model of a stack has the same configuration")
    stack = copy.deepcopy(models[0])
    if len(models) > 1:
        for name, _ in list(stack.named_parameters()):
            owner, _, attribute = name.rpartition(".")
            weights = stack_weights([m.get_parameter(name).detach() for m in models])
            setattr(stack.get_submodule(owner), attribute, nn.Parameter(weights.to(models[0].out.weight.device)))
        stack.num_models = len(models)
    return stack


def clip_grad_norms_(model: MetaSeq2Seq, max_norm: float) -> torch.Tensor:
    """Clip each model's gradient to norm max_norm on its own norm, as clip_grad_norm_ does for one model (a
    stack of one calls it); returns the M norms before clipping."""
    M = model.num_models
    if M == 1:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).view(1)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.view(M, -1), dim=1) for g in grads]),
                                     dim=0)                                                # (M,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view((M,) + (1,) * (g.dim() - 1)).to(g.dtype))
    return norms


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """`model` in eval mode (no dropout) inside the block, and back in the mode it had after it, error or not."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
