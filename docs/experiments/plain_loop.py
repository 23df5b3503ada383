"""Issue 23: our model in a plain training loop, to take our trainer apart from our model.

    python docs/experiments/plain_loop.py --store runs/stores/seedK/scan_prim_permutation --stream_seed K \\
        --seed S [--original_init N] [--num_episodes 4500] [--fused]

The loop is the original's `train()` written around our MetaSeq2Seq: per episode zero_grad, train mode, our
loss on the episode (support items appended as queries), backward, clip at 50, Adam (lr 0.001, not fused unless
--fused) step; no lr decay (stop before 5,000 episodes to compare with a run that has one). Every 100 episodes
it validates on the store's 5 validation episodes with our trainer's `validate` and prints a line in the
original's log format (docs/experiments/me_arms.py reads it). Episodes come in the order that `cli.py train
--store S --seed K` streams them. The weights are ours after torch.manual_seed(S), or with --original_init N
the original's networks as built after torch.manual_seed(N) (its order and vocabulary sizes; as
me_original_loop_on_our_store.py --seed N builds them), copied in by the product's mapping; dropout then draws
from the global generator that follows. With --fused and the same seed it is our trainer step for step
(tests/test_plain_loop.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import me_original_loop_on_our_store as arm_b  # noqa: E402  (the loader order; the original's settings and networks)
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.store import shard_paths  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data import Tokenizer, collate_episodes, read_records  # noqa: E402
from trainer.model import MetaSeq2Seq, ModelConfig  # noqa: E402
from trainer.step import validate  # noqa: E402

VAL_EVERY = 100


def load_originals_networks(episode_type: str, seed: int, tokenizer: Tokenizer, model: MetaSeq2Seq) -> None:
    """Copy into `model` the original's initial networks after torch.manual_seed(seed), built as arm B builds them."""
    from evalsuite.original_checkpoint import VocabMap, copy_original_weights, original_named
    here = os.getcwd()
    try:
        original = arm_b.load_original(arm_b.original_dir())  # chdir's into its folder: its SCAN loader reads data/
        _, _, input_lang, output_lang = original.get_episode_generator(episode_type)
    finally:
        os.chdir(here)
    torch.manual_seed(seed)
    encoder = original.MetaNetRNN(arm_b.EMB_SIZE, input_lang.n_symbols, output_lang.n_symbols, arm_b.NLAYERS,
                                  arm_b.DROPOUT)
    decoder = original.AttnDecoderRNN(arm_b.EMB_SIZE, output_lang.n_symbols, arm_b.NLAYERS, arm_b.DROPOUT)
    copy_original_weights(original_named(encoder.named_parameters(), decoder.named_parameters()), model,
                          VocabMap.between(input_lang.symbols, output_lang.symbols, tokenizer))


def train(store: str, stream_seed: int, seed: int, num_episodes: int, fused: bool = False,
          original_init: int | None = None, log=print) -> MetaSeq2Seq:
    manifest = load_manifest(store)
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    order, val = arm_b.training_records(Path(store), stream_seed), read_records(shard_paths(store, "val"))
    torch.manual_seed(seed)
    model = MetaSeq2Seq(ModelConfig(len(tokenizer.input_vocab), len(tokenizer.output_vocab)))
    if original_init is not None:
        load_originals_networks(manifest["episode_type"], original_init, tokenizer, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=arm_b.LR, fused=fused)
    cfg = TrainConfig(episode_type=manifest["episode_type"], store=store)
    total, count, start = 0.0, 0, time.time()
    for episode, record in enumerate(order[:num_episodes], 1):
        optimizer.zero_grad()
        model.train()
        loss = model.loss(collate_episodes([record], tokenizer, support_as_queries=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), arm_b.CLIP)
        optimizer.step()
        total, count = total + loss.item(), count + 1
        if episode == 1 or episode % VAL_EVERY == 0:
            score = validate(model, [val], tokenizer, cfg, torch.device("cpu"))[0]
            log(f"{time.time() - start:.0f}s ({episode} {100 * episode // num_episodes}% finished) TrainLoss: "
                f"{total / count:.4f}, ValAccRetrieval: {score['retrieval']:.1f}, "
                f"ValAccGeneralize: {score['generalization']:.1f}")
            total, count = 0.0, 0
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--stream_seed", type=int, required=True, help="episode order of `cli.py train --seed K`")
    parser.add_argument("--seed", type=int, required=True, help="torch.manual_seed before our model is built")
    parser.add_argument("--num_episodes", type=int, default=4500)
    parser.add_argument("--fused", action="store_true", help="fused Adam, as our trainer")
    parser.add_argument("--original_init", type=int, default=None,
                        help="start from the original's networks as built after torch.manual_seed(N)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train(args.store, args.stream_seed, args.seed, args.num_episodes, args.fused, args.original_init,
          log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
