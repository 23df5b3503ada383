"""Issue 15, arm B: the original's training loop on OUR stored episodes (ME; issue 23 ran it on perm stores).

    python docs/experiments/me_original_loop_on_our_store.py --store runs/stores/seedK/ME --stream_seed K \\
        [--seed K] [--num_episodes 10000] [--log runs/cross_B/seedK.log]

The original code (facebookresearch/meta_seq2seq) is imported at run time from $METASEQ2SEQ_ORIGINAL, else
../shared/original beside the repository; nothing of it is copied here. The script chdir's into that folder
(its train.py reads data/ there) and re-creates the flow of its `__main__` block with its own functions and
defaults: MetaNetRNN + AttnDecoderRNN (emb 200, 2 layers, dropout 0.5), Adam lr 0.001 for the encoder and the
decoder separately, its `train()` (masked cross-entropy, clip 50 on each network's norm), `evaluation_battery`
every 100 episodes with its log line, and its decay: after episode k * 5000 the lr is multiplied by 0.1 and both
Adams are built anew (their moments start from zero). Dropout stays unseeded unless --seed is given (then
torch, random and numpy are seeded once, before the networks are built). It runs on the GPU where one is
visible, as the original does (CUDA_VISIBLE_DEVICES= keeps it on the CPU). It saves no checkpoint.

Only the episodes change: instead of its generator (`generate_ME`, `generate_prim_permutation`, ...), each
episode is a record of our store, made into the original's `build_sample(...)` dict with the original's own Lang
objects (get_episode_generator(the store's episode type); the store's symbols must be the original's):
  xs, ys = the record's support inputs/outputs, split on spaces (ME: 3 items; perm: 20);
  xq, yq = the record's 20 queries, then the support items again (inc_support_in_query, on because the
           original's default keeps the reconstruction loss);
  identifier = make_hashable of the record's full pairing written as "word -> ACTION" lines.
Training records come in the order that `cli.py train --store S --seed K` streams them (--stream_seed K:
trainer.data.StreamConfig(batch_size=1, seed=K) + make_loader, the same order as its default of one loader
worker), or in store order with --stream_seed -1. Each is used once; like our trainer, the run stops with an
error if the store holds fewer than --num_episodes. The 5 validation episodes are the store's val split,
converted the same way (the original builds its own 5 with generate_episode_test and a growing tabu set).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.store import shard_paths  # noqa: E402
from pipeline.vocab import SPECIAL_TOKENS  # noqa: E402
from references import load_original_train, original_dir  # noqa: E402  ($METASEQ2SEQ_ORIGINAL, else ../shared/original)

# The original's defaults (its argparse and the constants of its __main__ block).
NUM_EPISODES_VAL, CLIP, MAX_TRY_NOVEL = 5, 50.0, 100
LR, LR_DECAY_SCHEDULE, NLAYERS, MAX_LENGTH_EVAL, EMB_SIZE, DROPOUT = 0.001, 5000, 2, 50, 200, 0.5


def load_original(folder: Path):
    """The original's train.py as a module (it imports model.py, masked_cross_entropy.py and
    generate_episode.py by their bare names), with the globals its __main__ block would set."""
    if not (folder / "train.py").is_file():
        sys.exit(f"the original code is not at {folder}: set METASEQ2SEQ_ORIGINAL to its folder")
    os.chdir(folder)  # it reads data/ relative to its own folder
    module = load_original_train(folder, keep_on_path=True)
    module.clip, module.max_try_novel, module.use_resconstruct_loss = CLIP, MAX_TRY_NOVEL, True
    return module


def check_vocab(manifest: dict, input_lang, output_lang) -> None:
    ours = [t for t in manifest["input_vocab"] if t not in SPECIAL_TOKENS], \
           [t for t in manifest["output_vocab"] if t not in SPECIAL_TOKENS]
    if (set(ours[0]), set(ours[1])) != (set(input_lang.symbols), set(output_lang.symbols)):
        sys.exit(f"the store's symbols are not the original's {input_lang.symbols} / {output_lang.symbols} for "
                 f"{manifest['episode_type']}: {ours}")


def to_sample(original, record: dict, input_lang, output_lang) -> dict:
    """One of our records as the original's episode dict (see the module docstring)."""
    split = lambda items, side: [it[side].split(" ") for it in items]  # noqa: E731
    queries = record["query"] + (record["support"] if original.use_resconstruct_loss else [])
    pairing = "\n".join(f"{m['src']} -> {m['tgt']}" for m in record["mapping"])
    return original.build_sample(split(record["support"], "input"), split(record["support"], "output"),
                                 split(queries, "input"), split(queries, "output"), input_lang, output_lang,
                                 original.make_hashable(pairing))


def training_records(store: Path, stream_seed: int) -> list[dict]:
    """All training records, in store order (stream_seed < 0) or in our loader's order for that seed."""
    from trainer.data import StreamConfig, Tokenizer, make_loader, read_records
    records = read_records(shard_paths(store, "train"))
    if stream_seed < 0:
        return records
    manifest = load_manifest(store)
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    stream = StreamConfig(shards=tuple(str(p) for p in shard_paths(store, "train")), batch_size=1,
                          tokenizer=tokenizer, seed=stream_seed, workers=0)
    by_key = {r["__key__"]: r for r in records}
    return [by_key[key] for keys, _ in make_loader(stream) for key in keys]


class Tee:
    """stdout to the terminal and to --log (the original prints from inside `train`, e.g. clipping)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()


def run(original, store: Path, num_episodes: int, stream_seed: int) -> None:
    """The original's __main__ flow for a new network of the store's episode type, with episodes from `store`."""
    import torch.optim as optim
    manifest = load_manifest(store)
    _, _, input_lang, output_lang = original.get_episode_generator(manifest["episode_type"])
    check_vocab(manifest, input_lang, output_lang)
    records = training_records(store, stream_seed)
    if len(records) < num_episodes:
        sys.exit(f"the store {store} holds {len(records)} training episodes, fewer than {num_episodes}")
    from trainer.data import read_records
    samples_val = [to_sample(original, r, input_lang, output_lang) for r in read_records(shard_paths(store, "val"))]
    order = "store order" if stream_seed < 0 else f"our loader order, seed {stream_seed}"
    print(f"Training the original's {manifest['episode_type']} network on {store} ({order}) for {num_episodes} episodes, "
          f"{len(samples_val)} validation episodes, on {'GPU' if original.USE_CUDA else 'CPU'}")

    encoder = original.MetaNetRNN(EMB_SIZE, input_lang.n_symbols, output_lang.n_symbols, NLAYERS, DROPOUT)
    decoder = original.AttnDecoderRNN(EMB_SIZE, output_lang.n_symbols, NLAYERS, DROPOUT)
    if original.USE_CUDA:
        encoder, decoder = encoder.cuda(), decoder.cuda()
    adam_learning_rate = LR
    print("  Set learning rate to " + str(adam_learning_rate))
    encoder_optimizer = optim.Adam(encoder.parameters(), lr=adam_learning_rate)
    decoder_optimizer = optim.Adam(decoder.parameters(), lr=adam_learning_rate)

    avg_train_loss, counter, start = 0.0, 0, time.time()
    for episode in range(1, num_episodes + 1):
        sample = to_sample(original, records[episode - 1], input_lang, output_lang)
        train_loss = original.train(sample, encoder, decoder, encoder_optimizer, decoder_optimizer, input_lang,
                                    output_lang)
        avg_train_loss += train_loss
        counter += 1
        if episode == 1 or episode % 100 == 0 or episode == num_episodes:
            acc_val_gen, acc_val_retrieval = original.evaluation_battery(samples_val, encoder, decoder, input_lang,
                                                                         output_lang, MAX_LENGTH_EVAL)
            fraction = float(episode) / float(num_episodes)
            print('{:s} ({:d} {:.0f}% finished) TrainLoss: {:.4f}, ValAccRetrieval: {:.1f}, ValAccGeneralize: {:.1f}'
                  .format(original.timeSince(start, fraction), episode, fraction * 100., avg_train_loss / counter,
                          acc_val_retrieval, acc_val_gen), flush=True)
            avg_train_loss, counter = 0.0, 0
        if episode % LR_DECAY_SCHEDULE == 0:  # as the original: new Adams at the lower rate, moments reset
            adam_learning_rate = adam_learning_rate * 0.1
            encoder_optimizer = optim.Adam(encoder.parameters(), lr=adam_learning_rate)
            decoder_optimizer = optim.Adam(decoder.parameters(), lr=adam_learning_rate)
            print('Set learning rate to ' + str(adam_learning_rate))
    print('Training complete')
    acc_val_gen, acc_val_retrieval = original.evaluation_battery(samples_val, encoder, decoder, input_lang,
                                                                 output_lang, MAX_LENGTH_EVAL, verbose=False)
    print('Acc Retrieval (val): ' + str(round(acc_val_retrieval, 1)))
    print('Acc Generalize (val): ' + str(round(acc_val_gen, 1)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="one of our stores, e.g. shards/ME")
    parser.add_argument("--num_episodes", type=int, default=10000)
    parser.add_argument("--stream_seed", type=int, default=0,
                        help="episode order of `cli.py train --seed K`; -1: store order")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed torch, random and numpy (init and dropout); default unseeded, as the original")
    parser.add_argument("--log", default=None, help="also append stdout to this file")
    args = parser.parse_args(argv)
    store = Path(args.store).resolve()  # before the chdir
    if args.log:
        Path(args.log).resolve().parent.mkdir(parents=True, exist_ok=True)
        sys.stdout = Tee(sys.stdout, Path(args.log).resolve())
    original = load_original(original_dir())
    if args.seed is not None:
        import numpy as np
        import torch
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
    run(original, store, args.num_episodes, args.stream_seed)


if __name__ == "__main__":
    main()
