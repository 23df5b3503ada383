"""What a run carries from step to step (model, optimizer, lr schedule, data position), how it starts,
how it is restored from a checkpoint for --resume, and what a checkpoint holds."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from pipeline import store as episode_store, threads
from pipeline.errors import UserError
from trainer import distributed
from trainer.checkpoint import load_checkpoint
from trainer.config import RESUME_KEYS, TrainConfig
from trainer.model import MetaSeq2Seq, ModelConfig


def model_config(cfg: TrainConfig, manifest: dict) -> ModelConfig:
    """The model of a run: each ModelConfig field is the TrainConfig field of its name (one home per setting),
    but for the vocabulary sizes, which are the store's."""
    settings = {f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if hasattr(cfg, f.name)}
    return ModelConfig(input_vocab_size=len(manifest["input_vocab"]),
                       output_vocab_size=len(manifest["output_vocab"]), **settings)


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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    episodes_done: int = 0
    steps: int = 0
    batches: int = 0        # loader batches trained in full (per process)
    partial: int = 0        # episodes trained from the next loader batch, when the last step cut it short
    last_val: dict | None = None
    history: list = field(default_factory=list)  # provenance of the earlier sessions of this run


def build_state(cfg: TrainConfig, manifest: dict, device: torch.device, episodes_done: int = 0) -> TrainState:
    """A fresh run; `episodes_done` > 0 starts its lr schedule there (a checkpoint converted from the original's)."""
    torch.manual_seed(cfg.seed)
    model = MetaSeq2Seq(model_config(cfg, manifest)).to(device)
    # The fused kernel does the whole update in one pass (docs/benchmarks.md). Same update rule as Adam.
    state = TrainState(model, torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True), episodes_done=episodes_done)
    state.scheduler = lr_schedule(state, cfg)
    return state


def lr_schedule(state: TrainState, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """By episodes seen, not steps: x0.1 at the first step by which another lr_decay_schedule episodes have
    been trained, whatever the batch size, a short last batch or an extension by --resume."""
    return torch.optim.lr_scheduler.LambdaLR(state.optimizer,
                                             lambda _: 0.1 ** (state.episodes_done // cfg.lr_decay_schedule))


def count_step(state: TrainState, cfg: TrainConfig, episodes: int) -> None:
    """After an optimizer step of `episodes` episodes: count them, start Adam afresh where the lr decays (as the
    original, unless keep_adam_at_decay), then set the lr for the next step."""
    decays_before = state.episodes_done // cfg.lr_decay_schedule
    state.episodes_done += episodes
    state.steps += 1
    if not cfg.keep_adam_at_decay and state.episodes_done // cfg.lr_decay_schedule > decays_before:
        state.optimizer.state.clear()  # its moments and bias correction, at the new lr
    state.scheduler.step()  # after counting the episodes: the lr follows the episodes seen


def check_resumable(path) -> None:
    """Before the store is prepared: a checkpoint converted from the original's without a store cannot resume."""
    if load_checkpoint(path).get("manifest_sha256") is None:
        raise UserError(f"cannot resume from {path}: it records no episode store (it was converted from the "
                        "original's checkpoint without one); convert it again with --store PATH, the store to "
                        "train on")


def restore(state: TrainState, cfg: TrainConfig, manifest_hash: str, world_size: int) -> None:
    ckpt = load_checkpoint(cfg.checkpoint_path)
    saved = ckpt["train_config"]
    for key in RESUME_KEYS:
        trained_with = saved.get(key)
        if trained_with != getattr(cfg, key):
            raise UserError(f"cannot resume from {cfg.checkpoint_path}: it was trained with {key}={trained_with!r}, "
                            f"this run asks for {getattr(cfg, key)!r}")
    position = ckpt["data_position"]
    if position["world_size"] != world_size:
        raise UserError(f"cannot resume from {cfg.checkpoint_path}: it ran on {position['world_size']} "
                        f"processes, this run has {world_size}")
    if ckpt["manifest_sha256"] != manifest_hash:
        raise UserError(f"cannot resume from {cfg.checkpoint_path}: its store {ckpt['store']} has changed since "
                        "(manifest hash differs)")
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.episodes_done, state.last_val = ckpt["episodes_done"], ckpt["val"]
    state.batches, state.partial = position["batches"], position.get("partial", 0)
    state.steps = ckpt.get("steps", position["batches"])  # checkpoints before "steps": one batch per step
    state.history = [*ckpt.get("provenance_history", []), *([ckpt["provenance"]] if "provenance" in ckpt else [])]
    threads.keep_for_run(ckpt.get("threads"), torch.set_num_threads)  # so that its products round as before
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])


@dataclass
class Session:
    """What one training process holds besides its TrainState."""
    cfg: TrainConfig
    ctx: distributed.DistContext
    device: torch.device
    manifest: dict
    manifest_hash: str
    provenance: dict


def checkpoint_payload(state: TrainState, session: Session) -> dict:
    cfg, manifest = session.cfg, session.manifest
    on_cuda = next(state.model.parameters()).is_cuda
    return {
        "episode_type": cfg.episode_type, "model_config": state.model.cfg.to_dict(), "train_config": asdict(cfg),
        "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
        "input_vocab": list(manifest["input_vocab"]), "output_vocab": list(manifest["output_vocab"]),
        "episodes_done": state.episodes_done, "steps": state.steps,
        "data_position": {"batches": state.batches, "partial": state.partial, "epoch": 0,
                          "world_size": session.ctx.world_size, "workers": cfg.workers},
        "store": str(cfg.store_path), "manifest_sha256": session.manifest_hash,
        "val_shards_sha256": episode_store.val_shards_sha256(manifest),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if on_cuda else None},
        "val": state.last_val, "threads": torch.get_num_threads(),
        "provenance": session.provenance, "provenance_history": state.history,
    }


# ---- where the data stream stands ------------------------------------------------------------------------

def resumed_batches(loader, state: TrainState):
    """(keys, batch, offset in its loader batch) from where the state left off. The stream is a pure function
    of the seed, so skip what was trained; a batch that a run's last step cut short gives the rest first."""
    batches = iter(loader)
    for _ in range(state.batches):
        if next(batches, None) is None:
            return
    if state.partial:
        item = next(batches, None)
        if item is None:
            return
        keys, batch = item
        yield keys[state.partial:], batch.drop(state.partial), state.partial
    for keys, batch in batches:
        yield keys, batch, 0


def advance_position(state: TrainState, offset: int, used: int, available: int, several_processes: bool) -> None:
    """Where the data stream stands after a step that trained `used` episodes of a loader batch that held
    `available` from `offset` on (under torchrun each process always takes its whole batch)."""
    if several_processes or used == available:
        state.batches, state.partial = state.batches + 1, 0
    else:
        state.partial = offset + used
