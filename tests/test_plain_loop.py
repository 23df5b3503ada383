"""docs/experiments/plain_loop.py, with fused Adam and the same seed, is our trainer step for step: the same
weights after a few episodes of a perm store with dropout on (so the same init, episode order and dropout masks)."""
from __future__ import annotations

import sys

import pytest
import torch

from pipeline.store import GenerateConfig, generate
from trainer.config import TrainConfig
from trainer.train import train

pytestmark = [pytest.mark.lab, pytest.mark.slow]  # a lab script of docs/experiments/; a perm store and 12 steps


@pytest.fixture(scope="module")
def plain_loop(load_lab_script):
    yield load_lab_script("plain_loop")
    sys.modules.pop("plain_loop")


def test_plain_loop_is_our_trainer(plain_loop, tmp_path):
    store = generate(GenerateConfig("scan_prim_permutation", num_episodes=4, out=str(tmp_path / "stores"),
                                    workers=1, progress=False))
    train(TrainConfig(episode_type="scan_prim_permutation", store=str(store), seed=3, num_episodes=4,
                      dir_model=str(tmp_path / "run"), generate_missing_store=False, progress=False, val_every=2))
    ours = torch.load(tmp_path / "run" / "net_scan_prim_permutation.pt", weights_only=True)["model"]
    model = plain_loop.train(str(store), stream_seed=3, seed=3, num_episodes=4, fused=True, log=lambda _: None)
    assert max((ours[k] - v).abs().max().item() for k, v in model.state_dict().items()) < 1e-5
    other = plain_loop.train(str(store), stream_seed=3, seed=4, num_episodes=4, fused=True, log=lambda _: None)
    assert max((ours[k] - v).abs().max().item() for k, v in other.state_dict().items()) > 1e-2  # the check can fail
