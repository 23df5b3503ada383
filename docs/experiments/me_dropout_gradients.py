"""Issue 15: with dropout on, is our expected gradient the original's? Same weights, same episode, many draws.

    python docs/experiments/me_dropout_gradients.py [--draws 400] [--emb 200] [--dropout 0.5] [--seed 0]
    python docs/experiments/me_dropout_gradients.py --episode_type scan_prim_permutation --draws 150

The loss test (tests/test_original_equivalence.py) compares the loss's mean and spread over dropout draws. This
compares what training follows: the mean gradient of every parameter over N draws, ours against the original's
(the original at its default init, its weights copied into ours by the test's mapping). Per parameter tensor it
prints ||mean_ours - mean_original|| / ||mean_original|| beside the same figure for two independent halves of the
original's own draws (the noise floor), and the share of entries whose difference is over 4 standard errors;
then the ratio of the summed variances, ours / original, beside the same for the original's two halves.
--episode_type scan_prim_permutation (issue 23) takes one training episode of our perm sampler (20 supports, 20
queries, SCAN's 13 words and 6 actions) instead of a short random one; at emb 200 a draw holds 3.3M numbers, so
keep --draws to about 150 there.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "benchmarks", ROOT / "tests"):
    sys.path.insert(0, str(path))
from references import load_original_train  # noqa: E402
import test_original_equivalence as eq  # noqa: E402  (the weight mapping and the episode builders)
from evalsuite.original_checkpoint import VocabMap  # noqa: E402
from pipeline.samplers import get_sampler  # noqa: E402
from pipeline.vocab import build_vocab  # noqa: E402
from trainer.data import Tokenizer, collate_episodes  # noqa: E402
from trainer.model import MetaSeq2Seq, ModelConfig  # noqa: E402


def use_vocabulary_of(sampler) -> None:
    """Point the equivalence tests' mapping (eq.TOKENIZER, eq.VOCAB) at the sampler's vocabulary."""
    eq.TOKENIZER = Tokenizer(tuple(build_vocab(sampler.input_symbols)), tuple(build_vocab(sampler.output_symbols)))
    eq.VOCAB = VocabMap.between(eq.original_symbols(eq.TOKENIZER.input_vocab),
                                eq.original_symbols(eq.TOKENIZER.output_vocab), eq.TOKENIZER)


def load_original():
    module = load_original_train()
    module.USE_CUDA, module.clip = False, 1e9  # no clipping: the raw gradients
    return module


def grads_of(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def in_our_layout(name: str, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The original's gradient in our parameter's shape, its vocabulary rows moved to ours (eq.copy_original_weights'
    mapping); our <pad> rows, which the original has not, stay 0 (as ours are: <pad> is not a class)."""
    out = grad.new_zeros(shape)
    out[eq.vocab_rows(name)] = grad
    return out


def draws_original(original, encoder, decoder, sample, n: int, names: list[str], shapes: list) -> torch.Tensor:
    params = [eq.original_parameters(encoder, decoder)[name] for name in names]
    out = []
    for _ in range(n):
        eq.original_loss(original, encoder, decoder, sample)
        out.append(torch.cat([in_our_layout(name, p.grad, shape).reshape(-1)
                              for name, p, shape in zip(names, params, shapes)]))
    return torch.stack(out)


def draws_ours(model, batch, n: int, names: list[str]) -> torch.Tensor:
    params, out = [dict(model.named_parameters())[name] for name in names], []
    model.train()
    for _ in range(n):
        model.zero_grad(set_to_none=False)
        model.loss(batch).backward()
        out.append(grads_of(params).clone())
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--emb", type=int, default=200)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--masked_attention", action="store_true",
                        help="as --mask_query_padding: each query's own steps (the original attends over the padded ones)")
    parser.add_argument("--pad_in_softmax", action="store_true",
                        help="ours with <pad> as a class, as before issue 15 (the original has none)")
    parser.add_argument("--episode_type", default=None, choices=["scan_prim_permutation"],
                        help="one training episode of this type (default: a short random ME-like one)")
    args = parser.parse_args()
    if args.episode_type:
        use_vocabulary_of(get_sampler(args.episode_type))
    original = load_original()
    n_in, n_out = eq.original_sizes()  # the original's Lang has no <pad>; ours masks it out of the softmax
    torch.manual_seed(args.seed)
    encoder = original.MetaNetRNN(args.emb, n_in, n_out, eq.NLAYERS, args.dropout)
    decoder = original.AttnDecoderRNN(args.emb, n_out, eq.NLAYERS, args.dropout)
    model = MetaSeq2Seq(ModelConfig(n_in + 1, n_out + 1, emb_size=args.emb, nlayers=eq.NLAYERS, dropout=args.dropout,
                                    mask_query_padding=args.masked_attention,
                                    pad_in_softmax=args.pad_in_softmax))
    eq.copy_original_weights(encoder, decoder, model)
    if args.episode_type:
        record = get_sampler(args.episode_type).sample_train(np.random.default_rng(args.seed), frozenset())
    else:
        rng = random.Random(args.seed)
        record = eq.random_episode(rng, 3, 20, in_len=lambda: rng.randint(2, 6))
    sample = eq.original_sample(original, record)
    batch = collate_episodes([record], eq.TOKENIZER, support_as_queries=True)
    names = list(eq.original_parameters(encoder, decoder))
    shapes = [dict(model.named_parameters())[name].shape for name in names]
    sizes = [shape.numel() for shape in shapes]
    theirs = draws_original(original, encoder, decoder, sample, args.draws, names, shapes).split(sizes, 1)
    ours = draws_ours(model, batch, args.draws, names).split(sizes, 1)
    print(f"{args.draws} draws each, emb {args.emb}, dropout {args.dropout}; per tensor: ||ours - original|| / "
          "||original|| of the mean gradient, the same for two halves of the original's draws, share over 4 SE, "
          "summed variance ours / original, the same for the original's two halves")
    half = args.draws // 2
    for name, t, o in zip(names, theirs, ours):
        mean_t, mean_o = t.mean(0), o.mean(0)
        se = (t.var(0) / len(t) + o.var(0) / len(o)).sqrt().clamp(min=1e-20)
        rel = ((mean_o - mean_t).norm() / mean_t.norm()).item()
        floor = ((t[:half].mean(0) - t[half:].mean(0)).norm() / mean_t.norm()).item() / 2 ** 0.5
        over = ((mean_o - mean_t).abs() > 4 * se).float().mean().item()
        flag = "  <--" if rel > 3 * floor and over > 0.01 else ""
        variance = (o.var(0).sum() / t.var(0).sum()).item()
        halves = (t[:half].var(0).sum() / t[half:].var(0).sum()).item()
        print(f"{name:40s} {rel:8.4f} {floor:8.4f} {over:7.3f} {variance:7.3f} {halves:7.3f}{flag}")


if __name__ == "__main__":
    main()
