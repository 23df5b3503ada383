"""Tests of the batched meta seq2seq model (trainer/model.py).

All in eval mode (no dropout) with a small E, so outputs are deterministic and the file runs in seconds.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.vocab import EOS_ID, PAD_ID, SOS_ID
from trainer.batch import EpisodeBatch, make_batch
from trainer.config import TrainConfig, upgrade_settings
from trainer.lstm import Packing, _cudnn_lstm, packed_lstm
from trainer.lstm import dropout as lstm_dropout
from trainer.model import DecodeResult, MetaSeq2Seq, ModelConfig, strip_decoded

V_IN, V_OUT = 11, 9
ATOL = 1e-5
CONFIGS = {
    "full": {},
    "no_memory": {"disable_memory": True},
    "no_attention": {"disable_attention": True},
    "no_memory_no_attention": {"disable_memory": True, "disable_attention": True},
    "query_padding_attended": {"mask_query_padding": False},  # the original's attention, the default
    "pad_in_softmax": {"pad_in_softmax": True},  # <pad> as a class: this project's first models
}
# The references that decode each query alone have no other queries to pad to: they stand for the masked model,
# which these tests build unless a config says otherwise. The default, the original's attention over the
# padded query steps, is checked against the original code instead (test_original_equivalence.py).
MASKED_CONFIGS = [name for name, kwargs in CONFIGS.items() if kwargs.get("mask_query_padding", True)]


def make_model(seed: int = 0, emb_size: int = 24, nlayers: int = 2, **kwargs) -> MetaSeq2Seq:
    kwargs.setdefault("mask_query_padding", True)
    torch.manual_seed(seed)
    model = MetaSeq2Seq(ModelConfig(V_IN, V_OUT, emb_size=emb_size, nlayers=nlayers, **kwargs))
    return model.eval()


def random_seq(rng: random.Random, vocab: int, lo: int, hi: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]


def random_episode(rng: random.Random, ns: int, nq: int, max_len: int = 5):
    """(support, query) lists of (input ids, output ids) without EOS."""
    pair = lambda: (random_seq(rng, V_IN, 1, max_len), random_seq(rng, V_OUT, 1, max_len))  # noqa: E731
    return [pair() for _ in range(ns)], [pair() for _ in range(nq)]


def random_episodes(seed: int, sizes=((3, 4), (1, 2), (4, 5), (2, 1))):
    rng = random.Random(seed)
    return [random_episode(rng, ns, nq) for ns, nq in sizes]


def batch_of(episodes) -> EpisodeBatch:
    return make_batch([s for s, _ in episodes], [q for _, q in episodes])


def assert_valid_logits_close(a: torch.Tensor, a_len: torch.Tensor, b: torch.Tensor, b_len: torch.Tensor):
    """Compare (nq, Tqo, V) logits of the same queries at their valid target steps only."""
    assert torch.equal(a_len, b_len)
    for q, n in enumerate(a_len.tolist()):
        torch.testing.assert_close(a[q, :n], b[q, :n], atol=ATOL, rtol=0)


def assert_decodes_equal(a: DecodeResult, b: DecodeResult, nq: int, ia: int = 0, ib: int = 0):
    """Episode ia of result a and episode ib of result b agree on their first nq queries."""
    assert torch.equal(a.lengths[ia, :nq], b.lengths[ib, :nq])
    for q, n in enumerate(a.lengths[ia, :nq].tolist()):
        assert torch.equal(a.tokens[ia, q, :n], b.tokens[ib, q, :n])
        if a.decoder_attention is not None:
            Tqi = min(a.decoder_attention.shape[-1], b.decoder_attention.shape[-1])
            torch.testing.assert_close(a.decoder_attention[ia, q, :n, :Tqi], b.decoder_attention[ib, q, :n, :Tqi],
                                       atol=ATOL, rtol=0)


# ---- config and helpers ----------------------------------------------------------------------------------

def test_config_round_trip_and_validation():
    cfg = ModelConfig(V_IN, V_OUT, emb_size=8, nlayers=1, dropout=0.1, disable_attention=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig(5, 6).to_dict() == {"input_vocab_size": 5, "output_vocab_size": 6, "emb_size": 200,
                                           "nlayers": 2, "dropout": 0.5, "disable_memory": False,
                                           "disable_attention": False, "mask_query_padding": False,
                                           "pad_in_softmax": False}
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        ModelConfig(V_IN, V_OUT, dropout=1.0)


def test_an_older_checkpoints_config_is_read_as_it_was_trained():
    cfg = ModelConfig(V_IN, V_OUT, emb_size=8, nlayers=1, dropout=0.1)
    names = cfg.to_dict().keys()
    today = {k: v for k, v in cfg.to_dict().items() if k not in ("mask_query_padding", "pad_in_softmax")}
    read = lambda saved: ModelConfig.from_dict(upgrade_settings(saved, names))  # noqa: E731
    # Written before the attention setting existed: padding masked, and <pad> in the softmax.
    assert read(today) == ModelConfig(**{**today, "mask_query_padding": True, "pad_in_softmax": True})
    # Written under the setting's earlier name, which meant the opposite.
    for attended in (False, True):
        older = {**today, "attend_query_padding": attended, "pad_in_softmax": False}
        assert read(older) == ModelConfig(**{**today, "mask_query_padding": not attended, "pad_in_softmax": False})
    train = upgrade_settings({"reset_adam_at_decay": False}, TrainConfig.__dataclass_fields__)
    assert train["keep_adam_at_decay"] is True and "reset_adam_at_decay" not in train
    assert upgrade_settings({}, TrainConfig.__dataclass_fields__)["keep_adam_at_decay"] is True


def test_strip_decoded():
    tokens = torch.tensor([[[5, 6, EOS_ID, PAD_ID], [7, 7, 7, 7]],
                           [[EOS_ID, PAD_ID, PAD_ID, PAD_ID], [PAD_ID] * 4]])
    lengths = torch.tensor([[3, 4], [1, 0]])
    assert strip_decoded(DecodeResult(tokens, lengths)) == [[[5, 6], [7, 7, 7, 7]], [[]]]


# ---- (a) batching does not change anything ---------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_batch_equals_each_episode_alone(name):
    model = make_model(**CONFIGS[name])
    episodes = random_episodes(seed=1)
    batch = batch_of(episodes)
    logits = model(batch)
    decoded = model.greedy_decode(batch, max_length=8, return_attention=True)
    for b, episode in enumerate(episodes):
        alone = batch_of([episode])
        nq = len(episode[1])
        assert_valid_logits_close(logits[b, :nq], batch.query_out_len[b, :nq], model(alone)[0], alone.query_out_len[0])
        decoded_alone = model.greedy_decode(alone, max_length=8, return_attention=True)
        assert_decodes_equal(decoded, decoded_alone, nq, ia=b)
        assert strip_decoded(decoded)[b] == strip_decoded(decoded_alone)[0]
        if decoded.memory_attention is not None:
            ns, Tqi = alone.support_in.shape[1], alone.query_in.shape[2]
            torch.testing.assert_close(decoded.memory_attention[b, :nq, :Tqi, :ns], decoded_alone.memory_attention[0],
                                       atol=ATOL, rtol=0)


# ---- an independent, unbatched reference -------------------------------------------------------------------

def reference_encode(encoder, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence (EOS appended), no padding and no packing -> (steps (T, E), final (E,))."""
    out, (h_n, _) = encoder.lstm(encoder.embedding(torch.tensor([seq + [EOS_ID]])))
    E = encoder.emb_size
    return out[0, :, :E] + out[0, :, E:], h_n[-2, 0] + h_n[-1, 0]


def reference_logits(model: MetaSeq2Seq, support, query) -> list[torch.Tensor]:
    """Teacher-forced logits (len(y) + 1, V) of each query, computed one query at a time from the design."""
    cfg, E = model.cfg, model.cfg.emb_size
    if not cfg.disable_memory:
        keys = torch.stack([reference_encode(model.input_encoder, x)[1] for x, _ in support])      # (ns, E)
        values = torch.stack([reference_encode(model.output_encoder, y)[1] for _, y in support])   # (ns, E)
    result = []
    for x, y in query:
        steps, final = reference_encode(model.input_encoder, x)                    # (T, E), (E,)
        if cfg.disable_memory:
            context, init = steps, final
        else:
            m = torch.softmax(steps @ keys.T / E ** 0.5, -1) @ values               # (T, E)
            context = torch.tanh(model.memory_combine(torch.cat([steps, m], -1)))  # (T, E)
            init = context[-1]
        h0 = init.expand(cfg.nlayers, 1, E).contiguous()
        h, _ = model.dec_lstm(model.dec_embedding(torch.tensor([[SOS_ID] + y])), (h0, h0))
        h = h[0]                                                                    # (len(y) + 1, E)
        if not cfg.disable_attention:
            ctx = torch.softmax(h @ context.T / E ** 0.5, -1) @ context
            h = torch.tanh(model.attn_combine(torch.cat([h, ctx], -1)))
        result.append(reference_output_layer(model, h))
    return result


def reference_output_layer(model: MetaSeq2Seq, h: torch.Tensor) -> torch.Tensor:
    """The output layer as the softmax sees it: without pad_in_softmax, <pad> is not a class (its logit -inf)."""
    logits = model.out(h)
    if model.cfg.pad_in_softmax:
        return logits
    is_pad = torch.arange(logits.shape[-1]) == PAD_ID
    return torch.where(is_pad, torch.full_like(logits, float("-inf")), logits)


def reference_token_loss(model: MetaSeq2Seq, h: torch.Tensor, target: int) -> torch.Tensor:
    """-log p(target) from a softmax over the classes alone: every output id, or every one but <pad>."""
    classes = [c for c in range(model.cfg.output_vocab_size) if model.cfg.pad_in_softmax or c != PAD_ID]
    return -F.log_softmax(model.out(h)[classes], -1)[classes.index(target)]


@pytest.mark.parametrize("name", MASKED_CONFIGS)
def test_matches_unbatched_reference(name):
    model = make_model(**CONFIGS[name])
    episodes = random_episodes(seed=13)
    logits = model(batch_of(episodes))
    with torch.no_grad():
        for b, (support, query) in enumerate(episodes):
            for q, ref in enumerate(reference_logits(model, support, query)):
                torch.testing.assert_close(logits[b, q, :len(ref)], ref, atol=ATOL, rtol=0)


# ---- (b) one teacher-forced decoder call == stepping ------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_teacher_forcing_equals_stepwise_decoding(name):
    model = make_model(**CONFIGS[name])
    batch = batch_of(random_episodes(seed=2))
    B, nq, Tqo = batch.query_out.shape
    with torch.no_grad():
        full = model(batch).view(B * nq, Tqo, -1)
        enc = model._encode(batch)
        state = tuple(s.contiguous() for s in model._initial_state(enc))      # (nlayers, M = 1, B*nq, E)
        prev = torch.full((1, B * nq), SOS_ID)
        steps = []
        for t in range(Tqo):
            logits, state, _ = model._decode_step(prev, state, enc.context, enc.context_mask)
            steps.append(logits[0])
            prev = batch.query_out.view(1, B * nq, Tqo)[..., t]
    valid = torch.arange(Tqo) < batch.query_out_len.view(B * nq, 1)       # padded steps are not computed
    torch.testing.assert_close(torch.stack(steps, 1)[valid], full[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_decode_agrees_with_teacher_forcing_on_its_own_output(name):
    # Feeding the greedy output back as the target, the teacher-forced argmax must reproduce it.
    model = make_model(**CONFIGS[name])
    batch = batch_of(random_episodes(seed=3))
    decoded = model.greedy_decode(batch, max_length=6)
    fed = dataclasses.replace(batch, query_out=decoded.tokens, query_out_len=decoded.lengths)
    argmax = model(fed).argmax(-1)
    valid = torch.arange(decoded.tokens.shape[-1]) < decoded.lengths.unsqueeze(-1)
    assert valid.any()
    assert torch.equal(argmax[valid], decoded.tokens[valid])


# ---- (c) padding changes nothing ---------------------------------------------------------------------------

def pad_with_garbage(batch: EpisodeBatch, extra_items: int = 2, extra_steps: int = 3, seed: int = 0) -> EpisodeBatch:
    """Extra padded support items and queries, and longer sequences; every padded slot holds random ids
    (not PAD), so nothing may depend on what padding contains."""
    gen = torch.Generator().manual_seed(seed)

    def grow(ids, lengths, vocab):
        B, n, T = ids.shape
        out = torch.randint(3, vocab, (B, n + extra_items, T + extra_steps), generator=gen)
        out_len = torch.zeros(B, n + extra_items, dtype=torch.long)
        out_len[:, :n] = lengths
        valid = torch.arange(T) < lengths.unsqueeze(-1)
        out[:, :n, :T] = torch.where(valid, ids, out[:, :n, :T])
        return out, out_len

    s_in, s_in_len = grow(batch.support_in, batch.support_in_len, V_IN)
    s_out, s_out_len = grow(batch.support_out, batch.support_out_len, V_OUT)
    q_in, q_in_len = grow(batch.query_in, batch.query_in_len, V_IN)
    q_out, q_out_len = grow(batch.query_out, batch.query_out_len, V_OUT)
    return EpisodeBatch(s_in, s_in_len, s_out, s_out_len, q_in, q_in_len, q_out, q_out_len)


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_changes_nothing(name):
    model = make_model(**CONFIGS[name])
    batch = batch_of(random_episodes(seed=4))
    padded = pad_with_garbage(batch)
    B, nq = batch.query_in_len.shape
    logits, logits_pad = model(batch), model(padded)
    for b in range(B):
        assert_valid_logits_close(logits[b], batch.query_out_len[b], logits_pad[b, :nq], padded.query_out_len[b, :nq])
    torch.testing.assert_close(model.loss(batch), model.loss(padded), atol=ATOL, rtol=0)

    decoded = model.greedy_decode(batch, max_length=7, return_attention=True)
    decoded_pad = model.greedy_decode(padded, max_length=7, return_attention=True)
    for b in range(B):
        assert_decodes_equal(decoded, decoded_pad, nq, ia=b, ib=b)
    assert strip_decoded(decoded) == strip_decoded(decoded_pad)
    # The extra queries are padding: nothing decoded for them.
    assert (decoded_pad.lengths[:, nq:] == 0).all() and (decoded_pad.tokens[:, nq:] == PAD_ID).all()


def grads_of(model: MetaSeq2Seq, batch: EpisodeBatch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.loss(batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_changes_no_gradient(name):
    # Extra padded support items, queries and steps, holding random ids: every gradient stays the same.
    model = make_model(**CONFIGS[name])
    batch = batch_of(random_episodes(seed=15))
    assert_grads_close(grads_of(model, batch), grads_of(model, pad_with_garbage(batch, seed=1)))


@pytest.mark.parametrize("name", CONFIGS)
def test_gradient_of_an_episode_padded_by_longer_ones(name):
    # Alone, episode A is not padded; batched with longer episodes L it is. The loss is the mean over
    # episodes, so grad(A) = 2 grad([A, L]) - grad([L]) if padding changes nothing.
    model = make_model(**CONFIGS[name])
    rng = random.Random(16)
    short = random_episode(rng, 2, 3, max_len=2)
    long = random_episode(rng, 5, 6, max_len=9)
    alone, longer_only, both = (grads_of(model, batch_of(eps)) for eps in ([short], [long], [short, long]))
    assert batch_of([short, long]).query_out.shape[-1] > batch_of([short]).query_out.shape[-1]
    assert_grads_close(alone, {k: 2 * both[k] - longer_only[k] for k in both})


def test_attention_on_padding_is_exactly_zero():
    model = make_model()
    padded = pad_with_garbage(batch_of(random_episodes(seed=5)))
    decoded = model.greedy_decode(padded, max_length=6, return_attention=True)
    q_valid = padded.query_mask[:, :, None, None]                              # (B, nq, 1, 1)

    mem = decoded.memory_attention                                             # (B, nq, Tqi, ns)
    assert (mem.masked_select(~padded.support_mask[:, None, None, :]) == 0).all()
    step_valid = torch.arange(mem.shape[2]) < padded.query_in_len.unsqueeze(-1)  # (B, nq, Tqi)
    row_sums = mem.sum(-1)[step_valid]
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums))

    dec = decoded.decoder_attention                                            # (B, nq, L, Tqi)
    assert (dec.masked_select(~step_valid.unsqueeze(2)) == 0).all()            # padded query steps
    assert (dec.masked_select(~q_valid) == 0).all()                            # padded queries
    out_valid = torch.arange(dec.shape[2]) < decoded.lengths.unsqueeze(-1)     # (B, nq, L)
    assert (dec[~out_valid] == 0).all()                                        # steps after EOS
    torch.testing.assert_close(dec.sum(-1)[out_valid], torch.ones(int(out_valid.sum())))


def test_episode_without_support_items_is_finite():
    model = make_model().train()
    rng = random.Random(6)
    support, query = random_episode(rng, 2, 3)
    batch = make_batch([support, []], [query, query])
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    decoded = model.eval().greedy_decode(batch, max_length=4, return_attention=True)
    assert (decoded.memory_attention[1] == 0).all()


# ---- (d) the loss ------------------------------------------------------------------------------------------

def test_loss_matches_hand_computation():
    model = make_model(emb_size=16)
    episodes = random_episodes(seed=7, sizes=((2, 3), (1, 1), (3, 2)))
    batch = batch_of(episodes)
    logits = model(batch)
    per_episode = []
    for b, (_, query) in enumerate(episodes):
        # Token-mean over this episode's unpadded targets, EOS included.
        lg = torch.cat([logits[b, q, :len(y) + 1] for q, (_, y) in enumerate(query)])
        tg = torch.tensor([t for _, y in query for t in y + [EOS_ID]])
        per_episode.append(F.cross_entropy(lg, tg))
    torch.testing.assert_close(model.loss(batch)[0], torch.stack(per_episode).mean(), atol=1e-6, rtol=0)


def stepwise_loss(model: MetaSeq2Seq, episodes) -> torch.Tensor:
    """The loss computed one query and one target token at a time: each query alone (no padding), its
    decoder stepped with nn.LSTM from the design's equations; token-mean per episode, mean over episodes."""
    cfg, E = model.cfg, model.cfg.emb_size
    per_episode = []
    for support, query in episodes:
        if not cfg.disable_memory:
            keys = torch.stack([reference_encode(model.input_encoder, x)[1] for x, _ in support])
            values = torch.stack([reference_encode(model.output_encoder, y)[1] for _, y in support])
        token_losses = []
        for x, y in query:
            steps, final = reference_encode(model.input_encoder, x)
            if cfg.disable_memory:
                context, init = steps, final
            else:
                m = torch.softmax(steps @ keys.T / E ** 0.5, -1) @ values
                context = torch.tanh(model.memory_combine(torch.cat([steps, m], -1)))
                init = context[-1]
            state = (init.expand(cfg.nlayers, 1, E).contiguous(),) * 2
            for prev, target in zip([SOS_ID] + y, y + [EOS_ID]):
                h, state = model.dec_lstm(model.dec_embedding(torch.tensor([[prev]])), state)
                h = h[0, 0]                                                         # (E,)
                if not cfg.disable_attention:
                    ctx = torch.softmax(context @ h / E ** 0.5, 0) @ context
                    h = torch.tanh(model.attn_combine(torch.cat([h, ctx])))
                token_losses.append(reference_token_loss(model, h, target))
        per_episode.append(torch.stack(token_losses).mean())
    return torch.stack(per_episode).mean()


@pytest.mark.parametrize("name", MASKED_CONFIGS)
def test_packed_loss_and_gradients_equal_a_stepwise_computation(name):
    model = make_model(**CONFIGS[name])
    episodes = random_episodes(seed=17, sizes=((3, 4), (1, 2), (2, 3)))
    packed = grads_of(model, batch_of(episodes))
    packed_loss = model.loss(batch_of(episodes))[0]
    model.zero_grad(set_to_none=True)
    reference = stepwise_loss(model, episodes)
    reference.backward()
    torch.testing.assert_close(packed_loss, reference, atol=1e-6, rtol=1e-5)
    assert_grads_close(packed, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


# ---- (e) ablations -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_shapes(name):
    model = make_model(**CONFIGS[name])
    batch = batch_of(random_episodes(seed=8))
    B, nq, Tqi = batch.query_in.shape
    ns, Tqo = batch.support_in.shape[1], batch.query_out.shape[2]
    assert model(batch).shape == (B, nq, Tqo, V_OUT)
    assert model.loss(batch).shape == (1,)  # one per model; a model is a stack of one
    result = model.greedy_decode(batch, max_length=5, return_attention=True)
    L = result.tokens.shape[-1]
    assert result.tokens.dtype == result.lengths.dtype == torch.long
    assert 1 <= L <= 5 and result.lengths.shape == (B, nq)
    cfg = model.cfg
    if cfg.disable_memory:
        assert result.memory_attention is None
    else:
        assert result.memory_attention.shape == (B, nq, Tqi, ns)
    if cfg.disable_attention:
        assert result.decoder_attention is None
    else:
        assert result.decoder_attention.shape == (B, nq, L, Tqi)
    plain = model.greedy_decode(batch, max_length=5)
    assert plain.memory_attention is None and plain.decoder_attention is None
    assert torch.equal(plain.tokens, result.tokens)


@pytest.mark.parametrize("disable_attention", [False, True])
def test_disable_memory_ignores_the_support_set(disable_attention):
    model = make_model(disable_memory=True, disable_attention=disable_attention)
    rng = random.Random(9)
    query = random_episode(rng, 0, 4)[1]
    a = batch_of([(random_episode(rng, 3, 0)[0], query)])
    b = batch_of([(random_episode(rng, 5, 0)[0], query)])
    assert torch.equal(model(a), model(b))
    # While the full model does use it.
    full = make_model()
    assert not torch.allclose(full(a), full(b))


# ---- greedy decoding stops ---------------------------------------------------------------------------------

def test_greedy_decode_stops_at_eos_and_at_max_length():
    model = make_model()
    batch = pad_with_garbage(batch_of(random_episodes(seed=10)))
    nq_valid = batch.query_mask
    with torch.no_grad():
        model.out.bias.fill_(0.0)
        model.out.weight.fill_(0.0)
        model.out.bias[EOS_ID] = 1.0                        # always EOS: one step
    r = model.greedy_decode(batch, max_length=9)
    assert r.tokens.shape[-1] == 1
    assert torch.equal(r.lengths, nq_valid.long())
    assert (r.tokens[nq_valid] == EOS_ID).all() and (r.tokens[~nq_valid] == PAD_ID).all()
    assert strip_decoded(r) == [[[]] * int(n) for n in nq_valid.sum(1)]

    with torch.no_grad():
        model.out.bias[EOS_ID] = -1.0
        model.out.bias[5] = 1.0                             # never EOS: max_length steps
    r = model.greedy_decode(batch, max_length=9)
    assert r.tokens.shape[-1] == 9
    assert torch.equal(r.lengths, nq_valid.long() * 9)
    assert strip_decoded(r)[0][0] == [5] * 9


def test_runs_under_cpu_bf16_autocast():
    # The trainer may use autocast for speed: the masking must survive low-precision scores.
    from trainer.precision import cpu_bf16_problem
    if cpu_bf16_problem():  # e.g. an AVX2-only CPU: oneDNN has no bf16 LSTM there (`train --amp bf16` refuses)
        pytest.skip(cpu_bf16_problem())
    model = make_model()
    batch = pad_with_garbage(batch_of(random_episodes(seed=14)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(batch)
        decoded = model.greedy_decode(batch, max_length=5, return_attention=True)
    torch.testing.assert_close(loss.float(), model.loss(batch), atol=0.05, rtol=0)
    assert (decoded.memory_attention.masked_select(~batch.support_mask[:, None, None, :]) == 0).all()
    assert (decoded.tokens[~batch.query_mask] == PAD_ID).all()


# ---- (f) it learns -----------------------------------------------------------------------------------------

def test_tiny_model_overfits_two_episodes():
    torch.manual_seed(0)
    model = MetaSeq2Seq(ModelConfig(V_IN, V_OUT, emb_size=32, nlayers=1, dropout=0.0))
    episodes = random_episodes(seed=11, sizes=((3, 4), (2, 3)))
    batch = batch_of(episodes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.05 * first
    model.eval()
    assert strip_decoded(model.greedy_decode(batch, max_length=8)) == [[y for _, y in q] for _, q in episodes]


# ---- (h) the packed LSTM (trainer/lstm.py) -----------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_lstm_equals_nn_lstm(bidirectional, with_state):
    # Against torch's own LSTM on the same PackedSequence, in float64: outputs, final states of every
    # layer, and the gradients of the inputs, the initial states and every weight.
    torch.manual_seed(0)
    layers, E, dirs = 2, 6, 2 if bidirectional else 1
    lstm = torch.nn.LSTM(5, E, layers, batch_first=True, bidirectional=bidirectional).double()
    lengths = torch.tensor([3, 1, 6, 6, 2, 1])                  # unsorted, ties, length 1, one full row
    N, T = len(lengths), 7
    x = torch.randn(N, T, 5, dtype=torch.double, requires_grad=True)
    state = tuple(torch.randn(layers * dirs, N, E, dtype=torch.double, requires_grad=True)
                  for _ in range(2)) if with_state else None
    packing = Packing.from_lengths(lengths[None], T, "cpu")                 # one model (M = 1)
    out, h_n = packed_lstm(lstm, packing.pack(x[None])[0], packing, state)
    ref, (ref_h_n, _) = lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), state)
    ref_out = pad_packed_sequence(ref, batch_first=True, total_length=T)[0]
    torch.testing.assert_close(packing.unpack(out[None])[0], ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_n, ref_h_n, atol=1e-12, rtol=0)

    weights = torch.randn_like(ref_out)
    inputs = [x, *lstm.parameters(), *(state or ())]
    ours = torch.autograd.grad((packing.unpack(out[None])[0] * weights).sum() + h_n.sum(), inputs)
    theirs = torch.autograd.grad((ref_out * weights).sum() + ref_h_n.sum(), inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_the_cuda_path_packs_for_nn_lstm_alike():
    # On CUDA packed_lstm hands our packing to nn.LSTM (cuDNN) as a PackedSequence; that hand-over runs
    # on the CPU too, so it is checked here against the CPU recurrence.
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(4, 5, 2, bidirectional=True).double()
    lengths = torch.tensor([2, 5, 1, 5])
    packing = Packing.from_lengths(lengths[None], 6, "cpu")
    x = torch.randn(int(lengths.sum()), 4, dtype=torch.double)
    state = tuple(torch.randn(4, 4, 5, dtype=torch.double) for _ in range(2))
    for a, b in zip(_cudnn_lstm(lstm, x, packing, state), packed_lstm(lstm, x, packing, state)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

def test_packing_round_trip():
    lengths = torch.tensor([2, 4, 1])
    packing = Packing.from_lengths(lengths[None], 5, "cpu")
    padded = torch.arange(15).view(1, 3, 5) + 1
    packed = packing.pack(padded)
    assert packed.tolist() == [[6, 1, 11, 7, 2, 8, 9]]            # time-major, longest row first
    assert packing.batch_sizes == [3, 2, 1, 1]
    assert (packing.flat_index // packing.width).tolist() == [[1, 0, 2, 1, 0, 1, 1]]   # each token's row
    assert torch.equal(packing.unpack(packed), padded * (torch.arange(5) < lengths.unsqueeze(1)))


def test_dropout_is_bernoulli_and_scaled():
    x = torch.ones(1000, 1000)
    for p in (0.1, 0.5):
        out = lstm_dropout(x, p, training=True)
        kept = out != 0
        assert torch.allclose(out[kept], torch.tensor(1 / (1 - p)))
        assert abs(kept.float().mean().item() - (1 - p)) < 0.005   # 1M draws: sd of the mean < 0.0005
    assert lstm_dropout(x, 0.5, training=False) is x


# ---- (g) CUDA ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", CONFIGS)
def test_cuda_matches_cpu(name):
    model = make_model(**CONFIGS[name])
    batch = pad_with_garbage(batch_of(random_episodes(seed=12)))
    logits, loss = model(batch), model.loss(batch)
    decoded = model.greedy_decode(batch, max_length=7, return_attention=True)
    gpu_model, gpu_batch = model.cuda(), batch.to("cuda")
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        gpu_logits, gpu_loss = gpu_model(gpu_batch), gpu_model.loss(gpu_batch)
        gpu_decoded = gpu_model.greedy_decode(gpu_batch, max_length=7, return_attention=True)
    B, nq = batch.query_in_len.shape
    for b in range(B):
        assert_valid_logits_close(logits[b], batch.query_out_len[b], gpu_logits[b].cpu(), batch.query_out_len[b])
    torch.testing.assert_close(gpu_loss.cpu(), loss, atol=ATOL, rtol=0)
    cpu_view = DecodeResult(gpu_decoded.tokens.cpu(), gpu_decoded.lengths.cpu(),
                            None if gpu_decoded.memory_attention is None else gpu_decoded.memory_attention.cpu(),
                            None if gpu_decoded.decoder_attention is None else gpu_decoded.decoder_attention.cpu())
    for b in range(B):
        assert_decodes_equal(decoded, cpu_view, nq, ia=b, ib=b)
