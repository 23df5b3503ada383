"""The training loop: B episodes per optimizer step, streamed from the store, on CPU or GPU, under torchrun.

Faithful to the paper's protocol (Adam, lr decayed x0.1 every `lr_decay_schedule` episodes, gradient-norm
clip 50, masked cross-entropy, support loss), but the decay is a scheduler: rebuilding the optimizer, as
the original did, silently resets Adam's moments.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from evalsuite.metrics import score_episodes
from pipeline import store as episode_store
from pipeline.errors import UserError
from pipeline.samplers import get_sampler
from pipeline.shardio import check_writable_dir
from trainer import distributed
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.data import StreamConfig, Tokenizer, make_loader, read_records
from trainer.evaluate import decode_records
from trainer.model import MetaSeq2Seq, ModelConfig

# The default recipe, per experiment, chosen by time to validation accuracy on the 2-core CPU (docs/results.md).
# ME: 8 episodes per step with lr 2e-3 reaches 100% validation generalization at about 4,000 episodes, as the
# paper's protocol does at about 3,600, in a quarter of the wall time; B=16 was still on the loss plateau at
# 4,000. SCAN: the paper's one episode per step (lr 1e-3) reached 95% validation generalization at episode
# 2,900 (about 25 minutes), while B=8 with lr 2e-3 sat near 12% until its lr decay and needed 7,600 episodes.
# --batch_size 1 always keeps the paper's lr 1e-3.
PAPER_LR, BATCHED_LR = 1e-3, 2e-3
DEFAULT_BATCH_SIZE = {"ME": 8}   # every other (SCAN) experiment: 1
DEFAULT_BATCH_SIZE_SCAN = 1


def default_batch_size(episode_type: str) -> int:
    return DEFAULT_BATCH_SIZE.get(episode_type, DEFAULT_BATCH_SIZE_SCAN)


def default_lr(batch_size: int) -> float:
    return PAPER_LR if batch_size == 1 else BATCHED_LR


@dataclass
class TrainConfig:
    episode_type: str = "ME"
    store: str | None = None              # default: shards/<episode_type>
    num_episodes: int = 10000
    batch_size: int | None = None         # episodes per optimizer step (all ranks together); default per type
    lr: float | None = None               # default: default_lr(batch_size)
    lr_decay_schedule: int = 5000         # episodes between x0.1 decays
    nlayers: int = 2
    emb_size: int = 200
    dropout: float = 0.5
    max_length_eval: int = 50
    fn_out_model: str = ""                # default: net_<episode_type>.pt
    dir_model: str = "out_models"
    disable_memory: bool = False
    disable_attention: bool = False
    disable_recon_loss: bool = False
    workers: int = 1                      # DataLoader workers; loading is light next to the model
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    clip: float = 50.0
    val_every: int = 100                  # episodes
    checkpoint_every: int = 1000          # episodes
    amp: str = "none"                     # "none" or "bf16" autocast
    compile: bool = False
    generate_missing_store: bool = True
    progress: bool = True
    stop_after: int | None = None         # stop (with a checkpoint) after this many episodes: for tests

    def __post_init__(self):
        if self.batch_size is None:
            self.batch_size = default_batch_size(self.episode_type)
        if self.lr is None:
            self.lr = default_lr(self.batch_size)

    @property
    def store_path(self) -> Path:
        return Path(self.store or Path("shards") / self.episode_type)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.dir_model) / (self.fn_out_model or f"net_{self.episode_type}.pt")


# Settings that must match for --resume to continue the same run.
RESUME_KEYS = ("episode_type", "num_episodes", "batch_size", "lr", "lr_decay_schedule", "nlayers", "emb_size",
               "dropout", "disable_memory", "disable_attention", "disable_recon_loss", "workers", "seed", "clip")


def check_config(cfg: TrainConfig, world_size: int) -> None:
    get_sampler(cfg.episode_type)  # an unknown type fails here, listing the valid ones, before any work
    for name in ("num_episodes", "batch_size", "lr_decay_schedule", "nlayers", "emb_size", "max_length_eval",
                 "val_every", "checkpoint_every"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.lr <= 0 or cfg.workers < 0:
        raise UserError("--lr must be positive and --workers non-negative")
    if cfg.amp not in ("none", "bf16"):
        raise UserError(f"--amp must be none or bf16, got {cfg.amp!r}")
    if cfg.batch_size % world_size:
        raise UserError(f"--batch_size {cfg.batch_size} must divide evenly over {world_size} processes")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name != "cpu":
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def prepare_store(cfg: TrainConfig, ctx: distributed.DistContext) -> dict:
    """The store's manifest; the store is generated first when it is missing and that is allowed."""
    path = cfg.store_path
    if not (path / "manifest.json").is_file():
        if not cfg.generate_missing_store:
            raise UserError(f"no episode store at {path}; create it with "
                            f"`python cli.py generate --episode_type {cfg.episode_type}`")
        if ctx.is_main:
            print(f"no episode store at {path}: generating {cfg.num_episodes} {cfg.episode_type} episodes first",
                  flush=True)
            episode_store.generate(episode_store.GenerateConfig(
                episode_type=cfg.episode_type, num_episodes=cfg.num_episodes, seed=cfg.seed,
                out=str(path.parent), progress=cfg.progress))
        distributed.barrier(ctx)
    problems = episode_store.verify_store(path)
    if problems:
        raise UserError(f"store {path} fails verification: {problems[0]} (run `python cli.py verify --store {path}`)")
    manifest = episode_store.load_manifest(path)
    if manifest["episode_type"] != cfg.episode_type:
        raise UserError(f"store {path} holds {manifest['episode_type']} episodes, not {cfg.episode_type}")
    return manifest


def model_config(cfg: TrainConfig, manifest: dict) -> ModelConfig:
    return ModelConfig(input_vocab_size=len(manifest["input_vocab"]), output_vocab_size=len(manifest["output_vocab"]),
                       emb_size=cfg.emb_size, nlayers=cfg.nlayers, dropout=cfg.dropout,
                       disable_memory=cfg.disable_memory, disable_attention=cfg.disable_attention)


class LossWrapper(torch.nn.Module):
    """DDP hooks `forward`, so the loss is the forward of this thin wrapper."""

    def __init__(self, model: MetaSeq2Seq):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


@dataclass
class TrainState:
    model: MetaSeq2Seq
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    episodes_done: int = 0
    steps: int = 0
    last_val: dict | None = None


def build_state(cfg: TrainConfig, manifest: dict, device: torch.device) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = MetaSeq2Seq(model_config(cfg, manifest)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # LambdaLR counts optimizer steps; a step is batch_size episodes, so this decays x0.1 at the first
    # step by which another lr_decay_schedule episodes have been seen.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 ** ((step * cfg.batch_size) // cfg.lr_decay_schedule))
    return TrainState(model, optimizer, scheduler)


def restore(state: TrainState, cfg: TrainConfig, manifest_hash: str, world_size: int) -> None:
    ckpt = load_checkpoint(cfg.checkpoint_path)
    saved = ckpt["train_config"]
    for key in RESUME_KEYS:
        if saved.get(key) != getattr(cfg, key):
            raise UserError(f"cannot resume from {cfg.checkpoint_path}: it was trained with {key}={saved.get(key)!r}, "
                            f"this run asks for {getattr(cfg, key)!r}")
    if ckpt["data_position"]["world_size"] != world_size:
        raise UserError(f"cannot resume from {cfg.checkpoint_path}: it ran on {ckpt['data_position']['world_size']} "
                        f"processes, this run has {world_size}")
    if ckpt["manifest_sha256"] != manifest_hash:
        raise UserError(f"cannot resume from {cfg.checkpoint_path}: its store {ckpt['store']} has changed since "
                        "(manifest hash differs)")
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.episodes_done, state.steps, state.last_val = ckpt["episodes_done"], ckpt["data_position"]["batches"], ckpt["val"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])


def checkpoint_payload(state: TrainState, cfg: TrainConfig, manifest: dict, manifest_hash: str,
                       world_size: int) -> dict:
    on_cuda = next(state.model.parameters()).is_cuda
    return {
        "episode_type": cfg.episode_type, "model_config": state.model.cfg.to_dict(), "train_config": asdict(cfg),
        "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
        "input_vocab": list(manifest["input_vocab"]), "output_vocab": list(manifest["output_vocab"]),
        "episodes_done": state.episodes_done,
        "data_position": {"batches": state.steps, "epoch": 0, "world_size": world_size, "workers": cfg.workers},
        "store": str(cfg.store_path), "manifest_sha256": manifest_hash,
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if on_cuda else None},
        "val": state.last_val,
    }


def validate(state: TrainState, val_records: list[dict], tokenizer: Tokenizer, cfg: TrainConfig,
             device: torch.device) -> dict:
    results = decode_records(state.model, val_records, tokenizer, cfg.max_length_eval, device)
    scores = score_episodes(results)
    return {k: scores[k] for k in ("accuracy", "retrieval", "generalization", "n_episodes")}


def train_step(state: TrainState, loss_module: torch.nn.Module, batch, cfg: TrainConfig) -> float:
    autocast = torch.autocast(batch.query_in.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    with autocast:
        loss = loss_module(batch)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.clip)
    state.optimizer.step()
    state.scheduler.step()
    return float(loss.detach())


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def log_line(state: TrainState, rate: float, loss: float) -> str:
    val = state.last_val or {}
    return (f"episode {state.episodes_done} | {rate:.1f} episodes/s | loss {loss:.4f} | "
            f"val retrieval {_fmt(val.get('retrieval'))} | val generalization {_fmt(val.get('generalization'))}")


def crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def train_shards(manifest: dict, store: Path, cfg: TrainConfig, world_size: int) -> list[str]:
    available = manifest["counts"]["train"]
    if cfg.num_episodes > available:
        raise UserError(f"--num_episodes {cfg.num_episodes} is more than the {available} training episodes in "
                        f"{store}; episodes are never repeated silently: generate a larger store with "
                        f"`python cli.py generate --episode_type {cfg.episode_type} --num_episodes "
                        f"{cfg.num_episodes} --overwrite`")
    shards = [str(p) for p in episode_store.shard_paths(store, "train")]
    if len(shards) < world_size:
        raise UserError(f"the store has {len(shards)} training shards, fewer than the {world_size} processes")
    return shards


def train(cfg: TrainConfig) -> dict:
    """Train, checkpoint, and return the last validation scores and where the checkpoint is."""
    device_kind = resolve_device(cfg.device).type
    ctx = distributed.setup(device_kind)
    try:
        return _train(cfg, ctx, resolve_device(cfg.device, ctx.local_rank))
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device) -> dict:
    check_config(cfg, ctx.world_size)
    if ctx.is_main:
        check_writable_dir(cfg.checkpoint_path.parent, "--dir_model")
    manifest = prepare_store(cfg, ctx)
    manifest_hash = episode_store.manifest_sha256(cfg.store_path)
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    state = build_state(cfg, manifest, device)
    if cfg.resume:
        restore(state, cfg, manifest_hash, ctx.world_size)
    loss_module = LossWrapper(torch.compile(state.model) if cfg.compile else state.model)
    if ctx.active:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    stream = StreamConfig(shards=tuple(train_shards(manifest, cfg.store_path, cfg, ctx.world_size)),
                          batch_size=cfg.batch_size // ctx.world_size, tokenizer=tokenizer,
                          support_as_queries=not cfg.disable_recon_loss, seed=cfg.seed, workers=cfg.workers)
    val_records = read_records(episode_store.shard_paths(cfg.store_path, "val"))
    run = RunLog(cfg, ctx.is_main)
    _loop(state, loss_module, stream, val_records, tokenizer, cfg, ctx, device, manifest, manifest_hash, run)
    return {"val": state.last_val, "episodes_done": state.episodes_done, "checkpoint": str(cfg.checkpoint_path),
            "metrics": str(run.metrics_path)}


def _loop(state: TrainState, loss_module, stream: StreamConfig, val_records, tokenizer, cfg: TrainConfig,
          ctx: distributed.DistContext, device: torch.device, manifest: dict, manifest_hash: str, run: RunLog):
    target = min(cfg.num_episodes, cfg.stop_after or cfg.num_episodes)
    loader = make_loader(stream, pin_memory=device.type == "cuda")
    batches = iter(loader)
    for _ in range(state.steps):  # resume: the stream is a pure function of the seed, so skip what was trained
        next(batches)
    bar = tqdm(total=cfg.num_episodes, initial=state.episodes_done, unit="ep", dynamic_ncols=True,
               disable=not (ctx.is_main and cfg.progress))
    losses, window_start, window_episodes = [], time.perf_counter(), 0
    while state.episodes_done < target:
        keys, batch = next(batches, (None, None))
        total, smallest = distributed.sum_and_min(ctx, len(keys) if keys else 0, device)
        if smallest == 0:
            break
        overshoot = state.episodes_done + total - cfg.num_episodes
        if overshoot > 0 and not ctx.active:  # the last batch stops exactly at --num_episodes
            batch, total = batch.take(total - overshoot), total - overshoot
        losses.append(train_step(state, loss_module, batch.to(device, non_blocking=True), cfg))
        before, state.episodes_done, state.steps = state.episodes_done, state.episodes_done + total, state.steps + 1
        window_episodes += total
        bar.update(total)
        if crossed(before, state.episodes_done, cfg.val_every) or state.episodes_done >= target:
            if ctx.is_main:
                state.last_val = validate(state, val_records, tokenizer, cfg, device)
                rate = window_episodes / (time.perf_counter() - window_start)
                run.record(state, rate, sum(losses) / len(losses), bar)
            losses, window_start, window_episodes = [], time.perf_counter(), 0
        if ctx.is_main and (crossed(before, state.episodes_done, cfg.checkpoint_every)
                            or state.episodes_done >= target):
            save_checkpoint(cfg.checkpoint_path, checkpoint_payload(state, cfg, manifest, manifest_hash,
                                                                    ctx.world_size))
    bar.close()
    if state.episodes_done < target:
        raise UserError(f"the store ran out after {state.episodes_done} episodes, before {target}")
    if ctx.is_main:
        run.finish(state)


class RunLog:
    """One line per validation point on the terminal, the same as JSONL on disk, and a curve at the end."""

    def __init__(self, cfg: TrainConfig, is_main: bool):
        self.is_main = is_main
        stem = cfg.checkpoint_path.with_suffix("")
        self.metrics_path = stem.with_name(stem.name + ".metrics.jsonl")
        self.plot_path = stem.with_name(stem.name + ".curve.png")
        self.rows: list[dict] = []
        if is_main and not cfg.resume:
            self.metrics_path.unlink(missing_ok=True)

    def record(self, state: TrainState, rate: float, loss: float, bar) -> None:
        row = {"episodes": state.episodes_done, "episodes_per_s": round(rate, 2), "loss": loss,
               "lr": state.optimizer.param_groups[0]["lr"], **{f"val_{k}": v for k, v in state.last_val.items()}}
        self.rows.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        message = log_line(state, rate, loss)
        if bar.disable:
            print(message, flush=True)
        else:
            bar.write(message)  # above the progress bar, which stays at the bottom

    def finish(self, state: TrainState) -> None:
        from trainer.report import plot_curves  # matplotlib is slow to import; only needed once
        rows = [json.loads(line) for line in open(self.metrics_path)] if self.metrics_path.exists() else self.rows
        if rows:
            plot_curves(rows, self.plot_path)
