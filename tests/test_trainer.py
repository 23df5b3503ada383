"""The streaming data path and the training loop: exactly-once delivery, exact resume, DDP, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import store as episode_store
from pipeline.errors import UserError
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.data import StreamConfig, Tokenizer, make_loader
from trainer.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(emb_size=16, nlayers=2, dropout=0.5, batch_size=8, progress=False, val_every=40, checkpoint_every=40)


@pytest.fixture(scope="module")
def me_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores")
    return episode_store.generate(episode_store.GenerateConfig(
        "ME", num_episodes=160, shard_size=20, out=str(out), progress=False, workers=1))


def stream_keys(store: Path, workers: int, batch_size: int = 7) -> list[str]:
    manifest = episode_store.load_manifest(store)
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    cfg = StreamConfig(tuple(str(p) for p in episode_store.shard_paths(store, "train")), batch_size, tokenizer,
                       workers=workers, seed=3)
    keys = []
    for batch_keys, batch in make_loader(cfg):
        assert batch.num_episodes == len(batch_keys)
        keys += batch_keys
    return keys


@pytest.mark.parametrize("workers", [0, 2])
def test_every_training_episode_is_delivered_exactly_once(me_store, workers):
    keys = stream_keys(me_store, workers)
    assert sorted(keys) == [f"train-{i:08d}" for i in range(160)]
    assert keys != sorted(keys)  # and it is shuffled
    assert keys == stream_keys(me_store, workers)  # the same order every time: resume depends on it


def test_two_ranks_split_the_episodes_exactly(me_store, monkeypatch):
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(stream_keys(me_store, workers=2))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"train-{i:08d}" for i in range(160)]


def test_batches_carry_support_items_as_queries(me_store):
    manifest = episode_store.load_manifest(me_store)
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    shards = tuple(str(p) for p in episode_store.shard_paths(me_store, "train"))
    with_support = next(iter(make_loader(StreamConfig(shards, 4, tokenizer))))[1]
    without = next(iter(make_loader(StreamConfig(shards, 4, tokenizer, support_as_queries=False))))[1]
    assert with_support.query_in.shape[1] == 23 and without.query_in.shape[1] == 20
    assert torch.equal(with_support.query_in[:, 20:, :2], with_support.support_in)


def run_train(store: Path, model_dir: Path, **overrides) -> dict:
    settings = {**TINY, "num_episodes": 160, "workers": 2, **overrides}
    cfg = TrainConfig(episode_type="ME", store=str(store), dir_model=str(model_dir), **settings)
    return train(cfg)


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_weights(me_store, tmp_path):
    run_train(me_store, tmp_path / "straight")
    run_train(me_store, tmp_path / "resumed", stop_after=72)
    assert load_checkpoint(tmp_path / "resumed" / "net_ME.pt")["episodes_done"] == 72
    run_train(me_store, tmp_path / "resumed", resume=True)
    straight = load_checkpoint(tmp_path / "straight" / "net_ME.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "net_ME.pt")
    assert resumed["episodes_done"] == straight["episodes_done"] == 160
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert resumed["val"] == straight["val"]


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_other_weights(me_store, tmp_path):
    weights = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_train(me_store, tmp_path / run, num_episodes=40, seed=seed)
        weights.append(load_checkpoint(tmp_path / run / "net_ME.pt")["model"]["out.weight"])
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_checkpoint_is_plain_data_with_the_run_metadata(me_store, tmp_path):
    result = run_train(me_store, tmp_path, num_episodes=40)
    ckpt = load_checkpoint(Path(result["checkpoint"]))  # weights_only=True inside
    assert ckpt["episode_type"] == "ME" and ckpt["episodes_done"] == 40
    assert ckpt["manifest_sha256"] == episode_store.manifest_sha256(me_store)
    assert ckpt["input_vocab"] == episode_store.load_manifest(me_store)["input_vocab"]
    assert ckpt["data_position"]["batches"] == 5
    rows = [json.loads(line) for line in open(result["metrics"])]
    assert [r["episodes"] for r in rows] == [40]
    assert (tmp_path / "net_ME.curve.png").stat().st_size > 1000


def test_lr_decays_by_scheduler_and_keep_adam_at_decay_keeps_adams_state(me_store, tmp_path):
    result = run_train(me_store, tmp_path, num_episodes=48, lr_decay_schedule=24, lr=1e-3, keep_adam_at_decay=True)
    ckpt = load_checkpoint(Path(result["checkpoint"]))
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.1 ** 2)  # decayed at 24 and 48 episodes
    states = ckpt["optimizer"]["state"].values()
    assert states and all(s["step"].item() == 6 for s in states)  # Adam never restarted


def test_default_lr_is_the_papers_for_one_episode_per_step():
    assert TrainConfig(batch_size=1).lr == 1e-3
    assert TrainConfig().batch_size == 1 and TrainConfig().lr == 1e-3  # ME too: the paper's protocol
    assert TrainConfig(episode_type="scan_prim_permutation").batch_size == 1
    assert TrainConfig(episode_type="scan_length").lr == 1e-3
    assert TrainConfig(episode_type="scan_length", batch_size=4).lr == 2e-3
    assert TrainConfig(batch_size=1, lr=5e-4).lr == 5e-4


def test_resume_refuses_a_checkpoint_of_another_run(me_store, tmp_path):
    run_train(me_store, tmp_path, num_episodes=40)
    with pytest.raises(UserError, match="emb_size"):
        run_train(me_store, tmp_path, num_episodes=40, resume=True, emb_size=24)
    with pytest.raises(UserError, match="no checkpoint"):
        run_train(me_store, tmp_path / "empty", resume=True)


def test_asking_for_more_episodes_than_the_store_holds_is_an_error(me_store, tmp_path):
    with pytest.raises(UserError, match="more than the 160 training episodes"):
        run_train(me_store, tmp_path, num_episodes=161)


def run_cli(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """In the test's own temporary directory (tests/conftest.py), never the checkout: its out_models/ is the
    user's, and `train` without --dir_model would find a checkpoint there."""
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_tests_run_outside_the_checkout():
    assert ROOT not in Path.cwd().resolve().parents and Path.cwd().resolve() != ROOT


@pytest.mark.parametrize("make_bad, message", [
    (lambda store, tmp: ["--store", str(tmp / "nowhere"), "--no_generate"], "no episode store"),
    pytest.param(lambda store, tmp: ["--store", str(store), "--dir_model", "/proc/forbidden"],
                 "cannot write to --dir_model", marks=pytest.mark.slow),
    pytest.param(lambda store, tmp: ["--store", str(store), "--batch_size", "0"], "--batch_size must be positive",
                 marks=pytest.mark.slow),
    pytest.param(lambda store, tmp: ["--episode_type", "scan_jump", "--store", str(tmp / "ME")], "choose one of: ME",
                 marks=pytest.mark.slow),
    pytest.param(lambda store, tmp: ["--store", str(store), "--lr", "-1"], "error: --lr must be positive, got -1.0",
                 marks=pytest.mark.slow),
])
def test_train_bad_input_is_one_line(me_store, tmp_path, make_bad, message):
    result = run_cli("train", "--episode_type", "ME", "--emb_size", "16", "--num_episodes", "16",
                     "--no_progress", *make_bad(me_store, tmp_path), timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_refuses_a_store_that_fails_verification(me_store, tmp_path):
    import shutil
    broken = tmp_path / "ME"
    shutil.copytree(me_store, broken)
    shard = broken / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-700])
    result = run_cli("train", "--store", str(broken), "--emb_size", "16", "--num_episodes", "16", "--no_progress",
                     "--dir_model", str(tmp_path / "m"))
    assert result.returncode != 0 and "fails verification" in result.stderr and "train-000001" in result.stderr


@pytest.mark.slow
def test_torchrun_two_processes_generate_a_store_that_fits_them(tmp_path):
    # The store is missing: rank 0 generates it with a shard for each (process, worker), all ranks train.
    store = tmp_path / "two ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(ROOT / "cli.py"), "train", "--episode_type", "ME", "--store", str(store), "--emb_size", "16",
               "--num_episodes", "80", "--val_every", "40", "--batch_size", "8", "--workers", "1", "--no_progress",
               "--dir_model", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert [s["count"] for s in episode_store.load_manifest(store)["shards"] if s["split"] == "train"] == [40, 40]
    ckpt = load_checkpoint(tmp_path / "net_ME.pt")
    assert ckpt["episodes_done"] == 80 and ckpt["data_position"]["world_size"] == 2
    # Only rank 0 prints: the summary, each validation line, the checkpoint.
    assert result.stdout.count("episode 80 |") == 1
    assert result.stdout.count("checkpoint: ") == 1 and result.stdout.count("training run:") == 1
    assert "cpu (" in result.stdout and ", 2 process(es)" in result.stdout
