"""Issue 23: one trained perm model on training episodes of both samplers, ours and the original's.

    python docs/experiments/perm_same_model_two_samplers.py CHECKPOINT [N=500]

N episodes from our scan_prim_permutation sampler and N from the original's generate_prim_permutation
(shuffle on, the canonical pairing tabu, its support copies left off: our collate appends them), both seeded
with 123. For each side: the mean teacher-forced loss in eval mode with its standard error, and greedy
validation-style generalization and retrieval. The original is read from $METASEQ2SEQ_ORIGINAL, else
../shared/original (never shipped).
"""
from __future__ import annotations

import os
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "benchmarks"):
    sys.path.insert(0, str(path))
from evalsuite import api  # noqa: E402
from pipeline.samplers import get_sampler, pairing_identifier  # noqa: E402
from references import load_original_train, original_dir  # noqa: E402
from trainer.data import collate_episodes  # noqa: E402
from trainer.evaluate import decode_each_models_records  # noqa: E402
from trainer.metrics import score_episodes  # noqa: E402

SEED, MAX_TRY_NOVEL = 123, 100


def our_episodes(n: int) -> list[dict]:
    sampler = get_sampler("scan_prim_permutation")
    canonical = pairing_identifier(list(sampler.spec.slot_words), list(sampler.spec.slot_actions))
    rng = np.random.default_rng(SEED)
    return [sampler.sample_train(rng, frozenset([canonical])) for _ in range(n)]


def original_episodes(n: int) -> list[dict]:
    folder = original_dir()
    os.chdir(folder)  # its SCAN loader reads data/ there
    original = load_original_train(folder, keep_on_path=True)
    original.max_try_novel, original.use_resconstruct_loss = MAX_TRY_NOVEL, False
    random.seed(SEED)
    generate_train, generate_test, _, _ = original.get_episode_generator("scan_prim_permutation")
    tabu = original.tabu_update(set(), generate_test(set())["identifier"])
    pairs = lambda xs, ys: [{"input": " ".join(x), "output": " ".join(y)} for x, y in zip(xs, ys)]  # noqa: E731
    return [{"support": pairs(s["xs"], s["ys"]), "query": pairs(s["xq"], s["yq"])}
            for s in (generate_train(tabu) for _ in range(n))]


@torch.no_grad()
def scores(loaded, records: list[dict]) -> tuple[float, float, float, float]:
    model, tokenizer = loaded.model, loaded.tokenizer
    losses = [model.loss(collate_episodes([r], tokenizer, support_as_queries=True)).item() for r in records]
    decoded = score_episodes(decode_each_models_records(model, [records], tokenizer, 50, torch.device("cpu"))[0])
    return (statistics.mean(losses), statistics.stdev(losses) / len(losses) ** 0.5, decoded["generalization"],
            decoded["retrieval"])


def main() -> None:
    checkpoint, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 500
    torch.set_num_threads(1)
    loaded = api.load(checkpoint)  # eval mode
    for name, records in (("ours", our_episodes(n)), ("original", original_episodes(n))):
        loss, se, generalization, retrieval = scores(loaded, records)
        print(f"{name:9s} loss {loss:.4f} ± {se:.4f}  generalization {generalization:.1f}%  "
              f"retrieval {retrieval:.1f}%", flush=True)


if __name__ == "__main__":
    main()
