"""The episode store a run trains on: found, generated when missing and allowed, checked, and split into the
training shards of each process."""
from __future__ import annotations

import shlex
from pathlib import Path

from pipeline import store as episode_store
from pipeline.errors import UserError
from trainer import distributed
from trainer.config import TrainConfig


def store_layout(num_episodes: int, parts: int, largest: int = episode_store.GenerateConfig.shard_size
                 ) -> tuple[int, int]:
    """(episodes, shard_size) of a store for `parts` = processes x loader workers: a multiple of `parts`
    shards of one size, so that no worker is idle and every process holds the same number of episodes (a
    process that runs dry ends the step loop for all). May round the episodes up, never down."""
    if parts <= 1:
        return num_episodes, largest
    shards = -(-num_episodes // largest)
    shards = -(-shards // parts) * parts
    size = -(-num_episodes // shards)
    return shards * size, size


def prepare_store(cfg: TrainConfig, ctx: distributed.DistContext) -> dict:
    """The store's manifest; the store is generated first when it is missing and that is allowed."""
    path = cfg.store_path
    if not (path / "manifest.json").is_file():
        if not cfg.generate_missing_store:
            raise UserError(f"no episode store at {path}; create it with "
                            f"`{generate_command(cfg, path, ctx.world_size)}`")
        if ctx.is_main:
            generate_store(cfg, path, ctx.world_size)
        distributed.barrier(ctx)
    problems = episode_store.verify_store(path)
    if problems:
        raise UserError(f"store {path} fails verification: {problems[0]} "
                        f"(run `metaseq2seq verify --store {shlex.quote(str(path))}`)")
    manifest = episode_store.load_manifest(path)
    if manifest["episode_type"] != cfg.episode_type:
        raise UserError(f"store {path} holds {manifest['episode_type']} episodes, not {cfg.episode_type}")
    return manifest


def generate_store(cfg: TrainConfig, path: Path, world_size: int) -> None:
    parts = world_size * max(1, cfg.workers)
    episodes, shard_size = store_layout(cfg.num_episodes, parts)
    print(f"no episode store at {path}: generating {episodes} {cfg.episode_type} episodes first "
          f"(shards of {shard_size}, for {world_size} process(es) x {max(1, cfg.workers)} worker(s))", flush=True)
    episode_store.generate(episode_store.GenerateConfig(
        episode_type=cfg.episode_type, num_episodes=episodes, seed=cfg.seed, shard_size=shard_size,
        store=str(path), progress=cfg.progress))


def generate_command(cfg: TrainConfig, store: Path, world_size: int) -> str:
    """The `generate` line (quoted for the shell) that makes the store `store` as train would have made it."""
    episodes, shard_size = store_layout(cfg.num_episodes, world_size * max(1, cfg.workers))
    return shlex.join(["python", "cli.py", "generate", "--episode_type", cfg.episode_type, "--num_episodes",
                       str(episodes), "--seed", str(cfg.seed), "--shard_size", str(shard_size), "--store", str(store)])


def regenerate_command(manifest: dict, store: Path, parts: int, num_episodes: int | None = None) -> str:
    """The `generate` line (quoted for the shell) that rebuilds `store`, that very directory, with the
    parameters of its manifest, `num_episodes` (default: as many as now) and shards enough for `parts`
    processes x workers."""
    params = manifest.get("params", {})
    defaults = episode_store.GenerateConfig
    episodes, shard_size = store_layout(num_episodes or manifest["counts"]["train"], parts,
                                        params.get("shard_size", defaults.shard_size))
    return shlex.join([
        "python", "cli.py", "generate", "--episode_type", manifest["episode_type"], "--num_episodes", str(episodes),
        "--num_val_episodes", str(params.get("num_val_episodes", defaults.num_val_episodes)),
        "--seed", str(params.get("seed", defaults.seed)), "--shard_size", str(shard_size), "--store", str(store),
        "--overwrite"])


def train_shards(manifest: dict, store: Path, cfg: TrainConfig, world_size: int) -> list[str]:
    available = manifest["counts"]["train"]
    if cfg.num_episodes > available:
        command = regenerate_command(manifest, store, world_size * max(1, cfg.workers), cfg.num_episodes)
        raise UserError(f"--num_episodes {cfg.num_episodes} is more than the {available} training episodes in "
                        f"{store}; episodes are never repeated silently: generate a larger store with `{command}`")
    entries = sorted((s for s in manifest["shards"] if s["split"] == "train"), key=lambda s: s["name"])
    # Each process reads every world_size-th shard (webdataset.split_by_node); the smallest share bounds
    # how far the processes can go together.
    need = -(-cfg.num_episodes // world_size)
    smallest = min(sum(s["count"] for s in entries[rank::world_size]) for rank in range(world_size))
    if smallest < need:
        raise UserError(f"the store {store} has {len(entries)} training shard(s), too few to give each of "
                        f"{world_size} processes {need} episodes; regenerate it: "
                        f"{regenerate_command(manifest, store, world_size * max(1, cfg.workers))}")
    return [str(store / s["name"]) for s in entries]
