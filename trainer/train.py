"""`train`: one run, B episodes per optimizer step, streamed from the store, on CPU or GPU, under torchrun
(with --seeds, a stack of runs: trainer/train_stack.py). Both train through trainer/loop.py.

Faithful to the paper's protocol: Adam, lr decayed x0.1 every `lr_decay_schedule` episodes with a fresh
Adam at each decay (unless keep_adam_at_decay), gradient-norm clip 50, masked cross-entropy, support loss.

Daily use: a run never replaces another run's checkpoint unless told (--resume / --overwrite); SIGINT and
SIGTERM finish the current step and save; a finished run can be extended by resuming with a larger
--num_episodes (the data order and the lr schedule continue as in one longer run).

The rest of a run lives beside it: config.py (the settings and their checks), device.py, stores.py (the
episode store), state.py (model, optimizer, checkpoints), step.py (a step), loop.py (the loop), signals.py
(stopping), runlog.py (the log).
"""
from __future__ import annotations

import contextlib

import torch

from pipeline import provenance, threads
from pipeline import store as episode_store
from trainer import distributed
from trainer.checkpoint import claim_checkpoint
from trainer.config import TrainConfig, check_checkpoint_target, check_config, recipe, with_store_episode_type
from trainer.data import StreamConfig, Tokenizer, make_loader, read_records
from trainer.device import device_name, requested_device, resolve_device
from trainer.precision import use_exact_fp32
from trainer.runlog import RunLog
from trainer.state import (LossWrapper, Session, TrainState, build_state, check_resumable, restore,
                           resumed_batches)
from trainer.loop import Member, Run, loop
from trainer.stores import prepare_store, train_shards


# ---- the run ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Train, checkpoint, and return the last validation scores and where the checkpoint is.

    Raises TrainingInterrupted (a KeyboardInterrupt) after saving, when SIGINT or SIGTERM stopped it.
    With cfg.seeds, trains them as one stack and returns each seed's result (trainer/train_stack.py)."""
    if cfg.seeds:
        from trainer.train_stack import train_stack  # here: a single run does not need it
        return train_stack(cfg)
    name = requested_device(cfg.device, cfg.gpu)
    ctx = distributed.setup(resolve_device(name).type)
    try:
        return _train(cfg, ctx, resolve_device(name, ctx.local_rank))
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device) -> dict:
    # Every check that can fail comes before the first file is written. The first write is the checkpoint's
    # lock (one train per checkpoint); a run that fails before training leaves no new --dir_model behind.
    cfg = with_store_episode_type(cfg)
    check_config(cfg, ctx.world_size, device.type)
    with claim_checkpoint(cfg.checkpoint_path) if ctx.is_main else contextlib.nullcontext():
        check_checkpoint_target(cfg)
        return _run(cfg, ctx, device)


def _run(cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device) -> dict:
    use_exact_fp32(device)
    if cfg.resume:
        check_resumable(cfg.checkpoint_path)
    manifest = prepare_store(cfg, ctx)
    session = Session(cfg, ctx, device, manifest, episode_store.manifest_sha256(cfg.store_path),
                      provenance.collect(device_name(device)) if ctx.is_main else {})
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    state = build_state(cfg, manifest, device)
    if cfg.resume:
        restore(state, cfg, session.manifest_hash, ctx.world_size)
        if state.episodes_done >= cfg.num_episodes:
            return finished_already(state, session)
    shards = train_shards(manifest, cfg.store_path, cfg, ctx.world_size)
    run = RunLog(cfg, ctx.is_main, state.episodes_done)
    if ctx.is_main:
        print(summary(state, session, run), flush=True)
    loss_module = loss_module_for(state.model, cfg, ctx, device)
    stream = StreamConfig(shards=tuple(shards), batch_size=cfg.batch_size // ctx.world_size, tokenizer=tokenizer,
                          support_as_queries=not cfg.disable_recon_loss, seed=cfg.seed, workers=cfg.workers)
    val_records = read_records(episode_store.shard_paths(cfg.store_path, "val"))
    member = Member(cfg, state, session, val_records, None, run)
    batches = resumed_batches(make_loader(stream, pin_memory=device.type == "cuda"), state)
    try:
        loop(Run(cfg, ctx, device, state, [member], loss_module, tokenizer), batches)
    finally:
        run.close()
    return {"val": state.last_val, "episodes_done": state.episodes_done, "checkpoint": str(cfg.checkpoint_path),
            "metrics": str(run.metrics_path), "is_main": ctx.is_main}


def loss_module_for(model, cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device):
    """What a step calls for the loss: the model (compiled with --compile), under DDP with several processes."""
    loss_module = LossWrapper(torch.compile(model) if cfg.compile else model)
    if ctx.active:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    return loss_module


def finished_already(state: TrainState, session: Session) -> dict:
    cfg = session.cfg
    if session.ctx.is_main:
        print(f"{cfg.checkpoint_path} is a finished run: {state.episodes_done} episodes trained, --num_episodes "
              f"is {cfg.num_episodes}; nothing to do (resume with a larger --num_episodes to train on)", flush=True)
    metrics = RunLog.paths(cfg)[0]
    return {"val": state.last_val, "episodes_done": state.episodes_done, "checkpoint": str(cfg.checkpoint_path),
            "metrics": str(metrics), "is_main": session.ctx.is_main}


def thread_summary() -> str:
    policy = threads.applied()
    text = f"{torch.get_num_threads()}, GOMP_SPINCOUNT={policy.get('spincount')}"
    if policy.get("kept_from_checkpoint"):
        text += " (the count this run was trained with, kept for the whole run)"
    elif policy.get("adaptive"):
        text += f" (adaptive: other processes kept {policy['others_busy']} cores busy; kept for the whole run)"
    return text


def summary(state: TrainState, session: Session, run: "RunLog") -> str:
    """The start-of-run block: what runs where, on what, and where its results go."""
    cfg, ctx = session.cfg, session.ctx
    start = f"resuming from episode {state.episodes_done}" if cfg.resume else "from scratch"
    rows = [
        ("device", f"{session.provenance['device']}, {ctx.world_size} process(es)"
                   + (", bf16 autocast" if cfg.amp == "bf16" else "")),
        ("threads", thread_summary()),
        ("episode type", cfg.episode_type),
        ("recipe", recipe(cfg)),
        ("store", f"{cfg.store_path} (manifest sha256 {session.manifest_hash})"),
        ("batch size", f"{cfg.batch_size} episodes per step, {cfg.workers} loader worker(s) per process"),
        ("lr", f"{cfg.lr:g}, x0.1 every {cfg.lr_decay_schedule} episodes seen"),
        ("episodes", f"{cfg.num_episodes}, {start}"),
        ("checkpoint", f"{cfg.checkpoint_path} every {cfg.checkpoint_every} episodes and at the end"),
        ("metrics", f"{run.metrics_path} every {cfg.val_every} episodes; curve {run.plot_path}"),
    ]
    return "\n".join(["training run:"] + [f"  {name:<13}{value}" for name, value in rows])
