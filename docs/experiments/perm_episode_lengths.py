"""scan_prim_permutation: do our training episodes have the original's lengths? 2,000 episodes from each sampler.

    python docs/experiments/perm_episode_lengths.py [--episodes 2000]

Reads the original's generate_episode.py and its SCAN file from $METASEQ2SEQ_ORIGINAL, else ../shared/original
(never shipped). Prints
mean, sd and max of the words per query and support input and the actions per output, for both samplers.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "benchmarks"):
    sys.path.insert(0, str(path))
from pipeline.samplers import get_sampler  # noqa: E402
from references import original_dir, original_importable, original_missing  # noqa: E402


def length_stats(episodes: list[tuple[list, list]]) -> dict[str, tuple[float, float, int]]:
    sides = {"query in": [len(x.split()) for _, q in episodes for x, _ in q],
             "query out": [len(y.split()) for _, q in episodes for _, y in q],
             "support in": [len(x.split()) for s, _ in episodes for x, _ in s],
             "support out": [len(y.split()) for s, _ in episodes for _, y in s]}
    return {k: (round(statistics.mean(v), 2), round(statistics.pstdev(v), 2), max(v)) for k, v in sides.items()}


def original_available() -> bool:
    return (original_dir() / "generate_episode.py").is_file()


def original_episodes(n: int) -> list[tuple[list, list]]:
    folder, cwd = original_dir(), os.getcwd()
    with original_importable(folder):
        import generate_episode as ge
        os.chdir(folder)  # it reads data/ relative to its own folder
        try:
            templates = ge.load_scan_var("all", "train")
        finally:
            os.chdir(cwd)
        random.seed(0)
        return [ge.sample_augment_scan(20, 20, templates, True, 0, False)[:2] for _ in range(n)]


def our_episodes(n: int) -> list[tuple[list, list]]:
    sampler, rng = get_sampler("scan_prim_permutation"), np.random.default_rng(0)
    pairs = lambda items: [(d["input"], d["output"]) for d in items]  # noqa: E731
    return [(pairs(e["support"]), pairs(e["query"])) for e in
            (sampler.sample_train(rng, frozenset()) for _ in range(n))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=2000)
    args = parser.parse_args()
    if not original_available():
        sys.exit(original_missing())
    for name, episodes in (("original", original_episodes(args.episodes)), ("ours", our_episodes(args.episodes))):
        print(name, length_stats(episodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
