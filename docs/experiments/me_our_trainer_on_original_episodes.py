"""Issue 15, arm C: OUR trainer on episodes drawn by the original's generate_ME.

    python docs/experiments/me_our_trainer_on_original_episodes.py generate SEED OUT [NUM_EPISODES]
        # writes our store OUT/ME: 10,000 training episodes (default) and 5 validation episodes
    PYTHONPATH=docs/experiments python cli.py verify --store OUT/ME
    python docs/experiments/me_our_trainer_on_original_episodes.py train --store OUT/ME --seed K [train flags]
        # `cli.py train`, with this script's folder importable (the store names its family)

The original code (facebookresearch/meta_seq2seq) is imported at run time from $METASEQ2SEQ_ORIGINAL, else
../shared/original beside the repository; nothing of it is copied here. `generate` seeds Python's `random` (and
numpy, which its ME path does not use) with SEED and then draws exactly as the original's train.py does: first the
5 validation episodes from generate_episode_test (get_episode_generator('ME')), each one's identifier added to a
growing tabu set, then the training episodes from generate_episode_train with that tabu set, all from the one
`random` stream. Each episode becomes one of our records:
  support = its xs/ys (3 items, in its order), joined with spaces;
  query   = its 20 xq/yq, in its order. generate_ME runs with use_resconstruct_loss False, which changes no random
            draw but leaves off its 3 copies of the support items: our trainer appends them itself
            (support_as_queries, the default);
  mapping, identifier = its full pairing (parsed from its identifier), in our form (pairs in our vocabulary
            order; pipeline.samplers.pairing_identifier).
generate_ME's queries are `list(set(...))`, an order that depends on string hashing: `generate` re-runs itself
with PYTHONHASHSEED=0 so that the store's bytes are a function of SEED alone (which queries are drawn never
depends on it).
The store is written by pipeline.store.generate itself, as the store of an episode family of its own,
`me_our_trainer_on_original_episodes:original_episodes` (pipeline/families.py), which replays these episodes
(validation, then training in index order; one worker) instead of drawing from its generator. Its vocabulary is
ME's, in ME's order, and its params are our ME sampler's plus "episodes_from", so that it never passes for a
store of ours. `python cli.py verify` passes on it: the original's tabu identifier is make_hashable of the
pairing, sorted, so its training episodes avoid the validation pairings too.
"""
from __future__ import annotations

import importlib
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the family's module, by the name the store records
from pipeline import families, samplers, store  # noqa: E402
from references import load_original_train  # noqa: E402  ($METASEQ2SEQ_ORIGINAL, else ../shared/original)

FAMILY = "me_our_trainer_on_original_episodes:original_episodes"
NUM_EPISODES_VAL, MAX_TRY_NOVEL = 5, 100  # the constants of the original's __main__ block
EPISODES_FROM = ("the original's generate_ME (random.seed(SEED)); "
                 "docs/experiments/me_our_trainer_on_original_episodes.py")


def load_original(folder: Path | None = None):
    """The original's train.py as a module, with the globals its __main__ block would set (generate_ME reads
    them). Its folder goes on sys.path (it imports its modules by bare names); no chdir: ME reads no data."""
    module = load_original_train(folder, keep_on_path=True)  # FileNotFoundError where it is absent
    module.max_try_novel, module.use_resconstruct_loss = MAX_TRY_NOVEL, False  # see the module docstring
    module.USE_CUDA = False  # build_sample's tensors stay on the CPU; only the lists are used
    return module


def original_episodes_of(original, seed: int, num_episodes: int) -> tuple[list[dict], list[dict]]:
    """(validation samples, training samples) as the original's train.py draws them, after random.seed(seed)."""
    import numpy as np
    original.use_resconstruct_loss = False  # its support copies left off: see the module docstring
    random.seed(seed)
    np.random.seed(seed)
    generate_episode_train, generate_episode_test, _, _ = original.get_episode_generator("ME")
    tabu_episodes, samples_val = set(), []
    for _ in range(NUM_EPISODES_VAL):
        sample = generate_episode_test(tabu_episodes)
        samples_val.append(sample)
        tabu_episodes = original.tabu_update(tabu_episodes, sample["identifier"])
    return samples_val, [generate_episode_train(tabu_episodes) for _ in range(num_episodes)]


def to_episode(sample: dict) -> dict:
    """One of the original's samples as an episode of the family."""
    meaning = dict(line.split(" -> ") for line in sample["identifier"].split("\n"))
    words = [w for w in samplers.ME_INPUTS if w in meaning]
    if sorted(meaning) != sorted(samplers.ME_INPUTS) or sorted(meaning.values()) != sorted(samplers.ME_OUTPUTS):
        raise ValueError(f"not an ME pairing of our vocabulary: {sample['identifier']!r}")
    actions = [meaning[w] for w in words]
    pairs = lambda xs, ys: [(" ".join(x), " ".join(y)) for x, y in zip(xs, ys)]  # noqa: E731
    if len(sample["xq"]) != 20 or any(x in sample["xs"] for x in sample["xq"]):
        raise ValueError("expected 20 queries without the support items (use_resconstruct_loss False)")
    return {"identifier": samplers.pairing_identifier(words, actions), "mapping": list(zip(words, actions)),
            "support": pairs(sample["xs"], sample["ys"]), "query": pairs(sample["xq"], sample["yq"])}


REPLAY: dict[str, list] = {"val": [], "train": []}  # filled by generate(), taken in order by the store's writer


def replay(rng, split: str) -> dict:
    if not REPLAY[split]:
        raise RuntimeError("this family replays the original's episodes that generate() loads; it draws none")
    return REPLAY[split].pop(0)


original_episodes = families.EpisodeFamily(replay, samplers.ME_INPUTS, samplers.ME_OUTPUTS,
                                           params={**samplers.MESampler().params, "episodes_from": EPISODES_FROM})


def generate(seed: int, out: str, num_episodes: int = 10000, original=None) -> Path:
    original = original or load_original()
    samples_val, samples_train = original_episodes_of(original, seed, num_episodes)
    family_module = importlib.import_module(FAMILY.partition(":")[0])  # the instance the store's writer loads
    family_module.REPLAY.update(val=[to_episode(s) for s in samples_val], train=[to_episode(s) for s in samples_train])
    return store.generate(store.GenerateConfig(FAMILY, num_episodes=num_episodes, seed=seed, store=str(Path(out) / "ME"),
                                               num_val_episodes=NUM_EPISODES_VAL, progress=False, workers=1))


def train(args: list[str]) -> int:
    import cli
    return cli.run_cli(cli.cli, ["train", *args])


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        if os.environ.get("PYTHONHASHSEED") != "0":  # fixes the order of generate_ME's list(set(queries))
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
        print(generate(int(sys.argv[2]), sys.argv[3], *(int(a) for a in sys.argv[4:5])))
    else:
        sys.exit(train(sys.argv[2:]))
