"""docs/experiments/me_all_pairings.py: ME's episodes as a family of its own whose training may use the validation
pairings. Its store verifies as any store, through public functions only, and trains with `train` unpatched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.records import SPLIT_CODES
from pipeline.samplers import MESampler
from pipeline.store import shard_paths, verify_store
from trainer.data import read_records

pytestmark = pytest.mark.lab  # a lab script of docs/experiments/, apart from the product's suite

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "me_all_pairings.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)


def pairing(record: dict) -> str:
    return record["identifier"].split(": ", 1)[1]


def test_its_store_verifies_and_its_training_uses_the_validation_pairings(tmp_path):
    made = run_script("generate", "3", str(tmp_path), "200")
    assert made.returncode == 0, made.stderr[-1000:]
    store = tmp_path / "ME"
    sys.path.insert(0, str(SCRIPT.parent))  # the family's module, as the store records it
    try:
        assert verify_store(store) == []
    finally:
        sys.path.remove(str(SCRIPT.parent))
    val, train = (read_records(shard_paths(store, split)) for split in ("val", "train"))
    assert sum(pairing(r) in {pairing(v) for v in val} for r in train) > 0  # 5 of 24 pairings: about 40 of 200
    rng, sampler = np.random.default_rng([3, SPLIT_CODES["train"], 0]), MESampler()  # the store's first shard
    for record in train:  # what ME's sampler draws with nothing tabu, episode by episode
        expected = sampler.sample_train(rng, frozenset())
        assert (record["support"], record["query"], record["mapping"]) == \
               (expected["support"], expected["query"], expected["mapping"])
    trained = run_script("train", "--store", str(store), "--dir_model", str(tmp_path / "run"), "--num_episodes", "4",
                         "--emb_size", "8", "--val_every", "4", "--no_progress", "--threads", "1")
    assert trained.returncode == 0, trained.stderr[-1000:]
    assert (tmp_path / "run" / "net_me_all_pairings:all_pairings.pt").is_file()
