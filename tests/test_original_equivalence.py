"""Our model against the original code (facebookresearch/meta_seq2seq), run side by side.

The original is read from $METASEQ2SEQ_ORIGINAL, else ../shared/original (next to the repository) and driven
through its own train.py
functions: `build_sample` builds an episode with the support items appended as queries (its support loss),
`train` computes the masked cross-entropy over that query batch and backpropagates (with optimizers whose
lr is 0, so nothing moves), and `evaluate` decodes greedily for max_length steps. Both models are built
with dropout 0 (the original's `train` switches to train mode; with p = 0 that is eval mode), the
original's weights are copied into ours by the product's own name and vocabulary mapping
(evalsuite/original_checkpoint.py, which reads the original's checkpoints), and we run all the episodes of a
test as one padded batch while the original runs them one at a time.

1. Queries of equal input length within each episode (the original then pads no query step): the loss,
   the gradients of every parameter, the greedy outputs and both attentions agree to float tolerance, in
   the full model and its three ablations.
2. Queries of unequal length: the original's decoder attends over every step of the longest query, so a
   shorter query also attends to its padded steps (in the full model their context vectors are
   tanh(W [0; m] + b); without memory they are 0, which still takes a share of the softmax), while ours
   masks them. There the losses differ; the original's attention puts weight on padded steps;
   and run one query per episode (no padding at all), the original gives each query exactly our loss.
   The README lists this under "Differences from the original".
3. Training mode with dropout on: the masks are drawn differently, so only the distribution can agree; the
   loss over 300 draws has the original's mean and spread (weights drawn N(0, 0.3), so that dropout matters).
4. ME episodes from our sampler have the statistics of the original's generate_ME.
"""
from __future__ import annotations

import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.vocab import build_vocab
from trainer.data import Tokenizer, collate_episodes
from trainer.model import MetaSeq2Seq, ModelConfig, strip_decoded
from evalsuite.original_checkpoint import VocabMap, copy_original_weights as product_copy, original_named

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from references import load_original_train, original_dir, original_missing  # noqa: E402

ORIGINAL = original_dir()  # $METASEQ2SEQ_ORIGINAL, else ../shared/original

INPUT_SYMBOLS = ["dax", "lug", "wif", "zup", "fep", "blicket", "kiki"]
OUTPUT_SYMBOLS = ["RED", "YELLOW", "GREEN", "BLUE", "PURPLE"]
TOKENIZER = Tokenizer(tuple(build_vocab(INPUT_SYMBOLS)), tuple(build_vocab(OUTPUT_SYMBOLS)))
E, NLAYERS, MAX_LENGTH = 16, 2, 8
INIT_STD = 1.0
# The original clips at 50; here its clip is out of reach, so that its gradients are the raw ones. On these
# N(0, 1) weights a gradient can pass 50 (ours clips the same way: tests/test_stacked.py checks our clip).
CLIP = 1e9
CONFIGS = {
    "full": {},
    "no_memory": {"disable_memory": True},
    "no_attention": {"disable_attention": True},
    "no_memory_no_attention": {"disable_memory": True, "disable_attention": True},
}


@pytest.fixture(scope="module")
def original():
    """The original's train.py as a module (it imports model.py and masked_cross_entropy.py itself).

    Its directory is on sys.path only while it loads, and its bare module names are taken out of
    sys.modules again, so nothing leaks into other tests."""
    if not (ORIGINAL / "train.py").is_file():
        pytest.skip(f"{original_missing()}; these tests run it side by side with ours")
    module = load_original_train(ORIGINAL, "original_meta_seq2seq_train")
    module.USE_CUDA = False  # its tensors go to the GPU when one is visible; keep everything on the CPU
    module.clip = CLIP       # a global of its __main__ block that `train` reads
    return module


# ---- the mapping ---------------------------------------------------------------------------------------

def original_symbols(vocab: tuple[str, ...]) -> list[str]:
    """The symbol list handed to the original's Lang: our symbols without the special tokens. Lang appends SOS
    and EOS; it has no padding symbol (the original pads with SOS), so its decoder's softmax has one class fewer
    than our vocabulary, the one that our default masks out (pad_in_softmax off)."""
    return list(vocab[3:])


def original_sizes() -> tuple[int, int]:
    """The original's n_symbols of its input and output Lang: ours without <pad>."""
    return len(TOKENIZER.input_vocab) - 1, len(TOKENIZER.output_vocab) - 1


# The mapping under test is the product's (evalsuite/original_checkpoint.py), the one that reads the original's
# checkpoints: module names (original_named) and token rows (VocabMap, ours_of_original).
VOCAB = VocabMap.between(original_symbols(TOKENIZER.input_vocab), original_symbols(TOKENIZER.output_vocab), TOKENIZER)


def copy_original_weights(encoder, decoder, model: MetaSeq2Seq) -> None:
    """Copy the original's weights (its encoder and decoder are two modules) into ours, by the product's mapping."""
    product_copy(original_parameters(encoder, decoder), model, VOCAB)


def original_parameters(encoder, decoder) -> dict[str, torch.Tensor]:
    """The original's parameters (or their .grad) under our names, by the product's mapping."""
    return original_named(encoder.named_parameters(), decoder.named_parameters())


def vocab_rows(our_name: str):
    return VOCAB.rows(our_name)


# ---- building both sides -------------------------------------------------------------------------------

def build_pair(original, seed: int, disable_memory: bool = False, disable_attention: bool = False,
               mask_query_padding: bool = False):
    """The original's (encoder, decoder) with its own random init, and our model with those weights."""
    n_in, n_out = original_sizes()
    torch.manual_seed(seed)
    encoder_cls = original.WrapperEncoderRNN if disable_memory else original.MetaNetRNN
    encoder = encoder_cls(E, n_in, n_out, NLAYERS, 0.0)
    decoder = (original.DecoderRNN if disable_attention else original.AttnDecoderRNN)(E, n_out, NLAYERS, 0.0)
    with torch.no_grad():  # larger weights than the default init, so greedy outputs are varied, not one token
        for p in list(encoder.parameters()) + list(decoder.parameters()):
            p.normal_(0.0, INIT_STD)
    model = MetaSeq2Seq(ModelConfig(n_in + 1, n_out + 1, emb_size=E, nlayers=NLAYERS, dropout=0.0,  # + <pad>
                                    disable_memory=disable_memory, disable_attention=disable_attention,
                                    mask_query_padding=mask_query_padding))
    copy_original_weights(encoder, decoder, model)
    return encoder, decoder, model.eval()


def random_episode(rng: random.Random, ns: int, nq: int, in_len) -> dict:
    """A store record. in_len() gives each input's length; outputs have 1-4 tokens. Query inputs are kept
    distinct from the support inputs, so the original's retrieval/generalization split is well defined."""
    def pair(taken):
        while True:
            x = " ".join(rng.choice(INPUT_SYMBOLS) for _ in range(in_len()))
            if x not in taken:
                taken.add(x)
                return {"input": x, "output": " ".join(rng.choice(OUTPUT_SYMBOLS) for _ in range(rng.randint(1, 4)))}
    taken: set[str] = set()
    return {"support": [pair(taken) for _ in range(ns)], "query": [pair(taken) for _ in range(nq)]}


def original_sample(original, record: dict):
    """The episode as the original's train.py builds it: support items appended to the queries."""
    split = lambda items, side: [it[side].split() for it in items]  # noqa: E731
    s, q = record["support"], record["query"] + record["support"]
    return original.build_sample(split(s, "input"), split(s, "output"), split(q, "input"), split(q, "output"),
                                 original_lang(original, "input"), original_lang(original, "output"), "")


def original_lang(original, side: str):
    return original.Lang(original_symbols(getattr(TOKENIZER, f"{side}_vocab")))


def original_words(original, our_ids: list[int]) -> list[str]:
    """Our output ids as the original's symbols (SOS and EOS have its own names)."""
    original_id = {int(ours): i for i, ours in enumerate(VOCAB.output)}
    return [original_lang(original, "output").index2symbol[original_id[i]] for i in our_ids]


def original_loss(original, encoder, decoder, sample) -> float:
    """The original's train() on one episode: masked cross-entropy over its query batch, backward, its
    clip, and an optimizer step that changes nothing (lr 0). The gradients are left in .grad."""
    frozen = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (encoder, decoder)]
    return original.train(sample, encoder, decoder, *frozen, original_lang(original, "input"),
                          original_lang(original, "output"))


def unclipped_grads(encoder, decoder) -> dict[str, torch.Tensor]:
    """The gradients of original_loss under our names, checked to be below CLIP (the original clips the
    encoder and the decoder separately), so they are the raw gradients."""
    for module in (encoder, decoder):
        assert torch.stack([p.grad.norm() for p in module.parameters()]).norm() < 0.99 * CLIP
    return {name: p.grad.clone() for name, p in original_parameters(encoder, decoder).items()}


def original_decode(original, encoder, decoder, sample):
    with warnings.catch_warnings():  # its accuracy means warn on an empty group; we do not use them
        warnings.simplefilter("ignore", RuntimeWarning)
        _, _, predicted, _, dec_attn, mem_attn = original.evaluate(
            sample, encoder, decoder, original_lang(original, "input"), original_lang(original, "output"),
            MAX_LENGTH)
    return predicted, dec_attn, mem_attn


# ---- 1. equal query lengths: the same model ---------------------------------------------------------------

EPISODE_SIZES = ((3, 4), (1, 2), (4, 3))  # (ns, nq); the support items come on top as queries


@pytest.mark.parametrize("name", CONFIGS)
def test_equal_length_queries_match_the_original(original, name):
    encoder, decoder, model = build_pair(original, seed=1, **CONFIGS[name])
    rng = random.Random(2)
    records = [random_episode(rng, ns, nq, in_len=lambda: 3) for ns, nq in EPISODE_SIZES]
    assert_same_as_original(original, encoder, decoder, model, records)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_default_matches_the_original_on_unequal_lengths(original, name):
    # The default decoder attention covers the original's padded steps, per episode, in a batch of episodes
    # whose longest queries differ: the same loss, gradients, outputs and attention as the original.
    encoder, decoder, model = build_pair(original, seed=5, **CONFIGS[name])
    rng = random.Random(6)
    records = [random_episode(rng, ns, nq, in_len=lambda: rng.randint(1, 5)) for ns, nq in EPISODE_SIZES]
    longest = [max(len(it["input"].split()) for it in r["query"] + r["support"]) for r in records]
    assert len(set(longest)) > 1 or min(longest) < 5
    assert_same_as_original(original, encoder, decoder, model, records)


def assert_same_as_original(original, encoder, decoder, model, records):
    batch = collate_episodes(records, TOKENIZER, support_as_queries=True)

    # Loss and gradients: ours averages episodes, so the original's per-episode gradients are averaged too.
    loss = model.loss(batch)
    loss.backward()
    orig_losses, orig_grads = [], []
    for record in records:
        orig_losses.append(original_loss(original, encoder, decoder, original_sample(original, record)))
        orig_grads.append(unclipped_grads(encoder, decoder))
    torch.testing.assert_close(loss.item(), sum(orig_losses) / len(records), atol=1e-5, rtol=1e-5)
    assert orig_grads[0].keys() == dict(model.named_parameters()).keys()
    for our_name, p in model.named_parameters():
        orig = torch.stack([g[our_name] for g in orig_grads]).mean(0)
        # fp32 on both sides, weights N(0, 1): an entry in a thousand differs by up to 1.5e-6 (gradients ~1e-2)
        torch.testing.assert_close(p.grad[vocab_rows(our_name)], orig, atol=2e-6, rtol=1e-4,
                                   msg=lambda m: f"{our_name}: {m}")

    # Greedy outputs and attention, episode by episode.
    decoded = model.greedy_decode(batch, MAX_LENGTH, return_attention=True)
    ours = strip_decoded(decoded)
    for b, record in enumerate(records):
        predicted, dec_attn, mem_attn = original_decode(original, encoder, decoder, original_sample(original, record))
        assert [original_words(original, seq) for seq in ours[b]] == predicted
        nq = len(predicted)
        if isinstance(mem_attn, torch.Tensor):                                  # (Tqi, nq, ns) -> (nq, Tqi, ns)
            ns = len(record["support"])
            width = mem_attn.shape[0]                           # the episode's longest query
            torch.testing.assert_close(decoded.memory_attention[b, :nq, :width, :ns], mem_attn.transpose(0, 1),
                                       atol=1e-6, rtol=0)
        if dec_attn:                                          # MAX_LENGTH x (nq, Tqi)
            for q, n in enumerate(decoded.lengths[b, :nq].tolist()):
                theirs = torch.stack([a[q] for a in dec_attn[:n]])          # (n, the episode's longest query)
                torch.testing.assert_close(decoded.decoder_attention[b, q, :n, :theirs.shape[1]], theirs,
                                           atol=1e-6, rtol=0)
                assert (decoded.decoder_attention[b, q, :n, theirs.shape[1]:] == 0).all()


# ---- 2. unequal query lengths: where the two differ ------------------------------------------------------

def our_query_losses(model: MetaSeq2Seq, batch) -> torch.Tensor:
    """Token-mean cross-entropy of each query of episode 0, from our teacher-forced logits."""
    logits = model(batch)[0]                                                # (nq, Tqo, V)
    return torch.stack([F.cross_entropy(logits[q, :n], batch.query_out[0, q, :n])
                        for q, n in enumerate(batch.query_out_len[0].tolist())])


@pytest.mark.parametrize("name", ["full", "no_memory"])
def test_masked_query_padding_differs_from_the_original_only_by_that_attention(original, name):
    encoder, decoder, model = build_pair(original, seed=3, mask_query_padding=True, **CONFIGS[name])
    rng = random.Random(4)
    record = random_episode(rng, 3, 4, in_len=lambda: rng.randint(1, 5))
    batch = collate_episodes([record], TOKENIZER, support_as_queries=True)
    lengths = batch.query_in_len[0]
    assert lengths.min() < lengths.max()
    sample = original_sample(original, record)

    # The losses differ: the original's shorter queries also attend to their padded steps.
    with torch.no_grad():
        ours = model.loss(batch).item()
    theirs = original_loss(original, encoder, decoder, sample)
    assert abs(ours - theirs) > 1e-4
    _, dec_attn, _ = original_decode(original, encoder, decoder, sample)
    padded_steps = torch.arange(batch.query_in.shape[-1]) >= lengths.unsqueeze(1)   # (nq, Tqi)
    assert (dec_attn[0][padded_steps] > 1e-3).all()           # the original: real weight on padding
    decoded = model.greedy_decode(batch, MAX_LENGTH, return_attention=True)
    assert (decoded.decoder_attention[0, :, 0][padded_steps] == 0).all()  # ours: none

    # That is the whole difference: one query per episode (nothing to pad), the original gives every query
    # our loss, computed in our padded batch.
    with torch.no_grad():
        per_query = our_query_losses(model, batch)
    queries = record["query"] + record["support"]
    for q, item in enumerate(queries):
        alone = original.build_sample(
            [it["input"].split() for it in record["support"]], [it["output"].split() for it in record["support"]],
            [item["input"].split()], [item["output"].split()],
            original_lang(original, "input"), original_lang(original, "output"), "")
        torch.testing.assert_close(original_loss(original, encoder, decoder, alone), per_query[q].item(),
                                   atol=1e-5, rtol=1e-5)


# ---- 3. training mode, dropout on: the same loss distribution -----------------------------------------------

@pytest.mark.slow
def test_dropout_in_training_gives_the_originals_loss_distribution(original):
    """With dropout on, the two draw their masks differently, so single losses differ; but if the masks
    sit in the same places at the same rate, the loss over many draws has the same mean and spread. A
    dropout applied somewhere else (or not applied) moves the mean by many standard errors."""
    (n_in, n_out), p, draws = original_sizes(), 0.5, 300
    torch.manual_seed(11)
    encoder = original.MetaNetRNN(E, n_in, n_out, NLAYERS, p)
    decoder = original.AttnDecoderRNN(E, n_out, NLAYERS, p)
    with torch.no_grad():  # weights large enough that dropout moves the loss (at the default init it barely does)
        for param in list(encoder.parameters()) + list(decoder.parameters()):
            param.normal_(0.0, 0.3)
    model = MetaSeq2Seq(ModelConfig(n_in + 1, n_out + 1, emb_size=E, nlayers=NLAYERS, dropout=p))  # + <pad>
    copy_original_weights(encoder, decoder, model)
    rng = random.Random(12)
    record = random_episode(rng, 3, 4, in_len=lambda: 3)
    sample, batch = original_sample(original, record), collate_episodes([record], TOKENIZER, support_as_queries=True)
    theirs = torch.tensor([original_loss(original, encoder, decoder, sample) for _ in range(draws)])
    model.train()
    with torch.no_grad():
        ours = torch.stack([model.loss(batch) for _ in range(draws)])
        for lstm in (model.input_encoder.lstm, model.output_encoder.lstm, model.dec_lstm):
            lstm.dropout = 0.0  # one placement taken away: the dropout between the LSTM layers
        fewer_masks = torch.stack([model.loss(batch) for _ in range(draws)])
    standard_error = (theirs.var() / draws + ours.var() / draws).sqrt().item()
    assert abs(theirs.mean().item() - ours.mean().item()) < 4 * standard_error, (theirs.mean(), ours.mean())
    assert 0.75 < (ours.std() / theirs.std()).item() < 1.33, (theirs.std(), ours.std())
    # the check can fail: without the inter-layer dropout the spread falls to about half (measured 0.56x)
    assert (fewer_masks.std() / theirs.std()).item() < 0.75, (theirs.std(), fewer_masks.std())


# ---- 4. ME episodes: the original's distribution -----------------------------------------------------------

def me_episode_statistics(episodes) -> dict[str, float]:
    """episodes: (support inputs, query inputs) as word lists, retrieval copies of the supports left out."""
    lengths, with_held_out, held_out_share, n = [0] * 7, 0, 0.0, 0
    for support, queries in episodes:
        held_out = ({"dax", "lug", "wif", "zup"} - {w for s in support for w in s}).pop()
        for q in queries:
            lengths[len(q)] += 1
            with_held_out += held_out in q
            held_out_share += q.count(held_out) / len(q)
            n += 1
    return {**{f"length {k}": lengths[k] / n for k in range(2, 7)}, "with the held-out word": with_held_out / n,
            "held-out share of words": held_out_share / n, "queries per episode": n / len(episodes)}


def test_me_episodes_follow_the_originals_sampler(original):
    """Our ME sampler against the original's generate_ME, 2,000 training episodes each: query lengths, how
    often the held-out (mutual-exclusivity) word appears and how much of a query it is, queries per episode."""
    import numpy as np
    from pipeline.samplers import get_sampler
    original.use_resconstruct_loss, original.max_try_novel = True, 100  # globals of its __main__ block
    generate_train = original.get_episode_generator("ME")[0]
    random.seed(0)
    theirs = []
    for _ in range(2000):
        sample = generate_train(set())
        supports = {tuple(s) for s in sample["xs"]}
        theirs.append((sample["xs"], [q for q in sample["xq"] if tuple(q) not in supports]))  # its support-loss copies
    sampler, rng = get_sampler("ME"), np.random.default_rng(0)
    ours = []
    for _ in range(2000):
        episode = sampler.sample_train(rng, frozenset())
        ours.append(([s["input"].split() for s in episode["support"]], [q["input"].split() for q in episode["query"]]))
    a, b = me_episode_statistics(theirs), me_episode_statistics(ours)
    assert a["queries per episode"] == b["queries per episode"] == 20
    for key in a:  # 40,000 queries a side: a share's standard error is below 0.003
        assert abs(a[key] - b[key]) < 0.012, (key, a[key], b[key])
