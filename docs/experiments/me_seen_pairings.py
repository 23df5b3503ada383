"""ME checkpoint scored on new episodes of each of the 24 pairings, split by whether its training saw the pairing.

Neither our training nor the original's sees the 5 validation pairings (an earlier reading of the original's tabu rule
said otherwise: docs/results.md, "Not the validation pairings"). This asks whether a model that misses 100% on our
validation would score higher on pairings it trained on.

    python docs/experiments/me_seen_pairings.py CHECKPOINT [EPISODES_PER_PAIRING]
"""
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline.samplers import ME_INPUTS, ME_OUTPUTS, MESampler, pairing_identifier  # noqa: E402
from pipeline.store import shard_paths  # noqa: E402
from trainer.checkpoint import load_checkpoint  # noqa: E402
from trainer.data import Tokenizer, read_records  # noqa: E402
from trainer.evaluate import decode_records  # noqa: E402
from trainer.metrics import score_episodes  # noqa: E402
from trainer.model import MetaSeq2Seq, ModelConfig  # noqa: E402


def episodes_by_group(val_ids: set[str], per_pairing: int) -> dict[str, list[dict]]:
    sampler, rng = MESampler(), np.random.default_rng(12345)
    groups = {"seen in training": [], "validation pairings": []}
    for actions in itertools.permutations(ME_OUTPUTS):
        words = list(ME_INPUTS)
        group = "validation pairings" if pairing_identifier(words, list(actions)) in val_ids else "seen in training"
        groups[group] += sampler.sample_more_validation(rng, [(words, list(actions))], per_pairing)
    return groups


def main(checkpoint: str, per_pairing: int = 20) -> None:
    ckpt = load_checkpoint(checkpoint)
    model = MetaSeq2Seq(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    tokenizer = Tokenizer(tuple(ckpt["input_vocab"]), tuple(ckpt["output_vocab"]))
    val_ids = {r["identifier"] for r in read_records(shard_paths(ckpt["store"], "val"))}
    for name, records in episodes_by_group(val_ids, per_pairing).items():
        scores = score_episodes(decode_records(model, records, tokenizer, 20, torch.device("cpu")))
        print(f"{checkpoint}: {name}: {len(records)} episodes, generalization {scores['generalization']:.1f}%")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
