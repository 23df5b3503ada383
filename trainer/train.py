"""The training loop: B episodes per optimizer step, streamed from the store, on CPU or GPU, under torchrun.

Faithful to the paper's protocol (Adam, lr decayed x0.1 every `lr_decay_schedule` episodes, gradient-norm
clip 50, masked cross-entropy, support loss), but the decay is a scheduler: rebuilding the optimizer, as
the original did, silently resets Adam's moments.

Daily use: a run never replaces another run's checkpoint unless told (--resume / --overwrite); SIGINT and
SIGTERM finish the current step and save; a finished run can be extended by resuming with a larger
--num_episodes (the data order and the lr schedule continue as in one longer run).

The rest of a run lives beside this loop: config.py (the settings and their checks), device.py, stores.py
(the episode store), state.py (model, optimizer, checkpoints), signals.py (stopping), runlog.py (the log).
"""
from __future__ import annotations

import contextlib
import time

import torch
from tqdm import tqdm

from pipeline import provenance, threads
from pipeline import store as episode_store
from pipeline.errors import UserError
from trainer import distributed
from trainer.checkpoint import claim_checkpoint, save_checkpoint
from trainer.config import TrainConfig, check_checkpoint_target, check_config, recipe, with_store_episode_type
from trainer.data import StreamConfig, Tokenizer, make_loader, read_records
from trainer.device import device_name, requested_device, resolve_device
from trainer.precision import use_exact_fp32
from trainer.runlog import RunLog, crossed
from trainer.signals import StopRequest, TrainingInterrupted
from trainer.state import (LossWrapper, Session, TrainState, advance_position, build_state, check_resumable,
                           checkpoint_payload, restore, resumed_batches)
from trainer.step import mean_per_model, train_step, validate
from trainer.stores import prepare_store, train_shards


def save(state: TrainState, session: Session, run: RunLog) -> int:
    """Rank 0 redraws the curve and writes the checkpoint (atomically); returns the episode count saved."""
    if session.ctx.is_main:
        run.draw()
        save_checkpoint(session.cfg.checkpoint_path, checkpoint_payload(state, session))
    return state.episodes_done


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
    try:
        with StopRequest() as stop:
            _loop(state, session, loss_module, stream, val_records, tokenizer, run, stop)
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


def _loop(state: TrainState, session: Session, loss_module, stream: StreamConfig, val_records, tokenizer,
          run: RunLog, stop: StopRequest) -> None:
    cfg, ctx = session.cfg, session.ctx
    target = min(cfg.num_episodes, cfg.stop_after or cfg.num_episodes)
    batches = resumed_batches(make_loader(stream, pin_memory=session.device.type == "cuda"), state)
    bar = tqdm(total=cfg.num_episodes, initial=state.episodes_done, unit="ep", dynamic_ncols=True,
               disable=not (ctx.is_main and cfg.progress))
    saved_at = state.episodes_done if cfg.resume else None
    try:
        stopped, saved_at = _steps(state, session, loss_module, batches, (val_records, tokenizer), run, stop, bar,
                                   target, saved_at)
    finally:
        batches.close()  # the loader's workers end now, not at interpreter exit
        bar.close()
    if stopped and state.episodes_done < target:
        if state.episodes_done not in (saved_at, 0):
            saved_at = save(state, session, run)
        raise TrainingInterrupted(state.episodes_done, cfg.num_episodes,
                                  cfg.checkpoint_path if saved_at is not None else None, ctx.is_main)
    if state.episodes_done < target:
        raise UserError(f"the store ran out after {state.episodes_done} episodes, before {target}")


def _steps(state: TrainState, session: Session, loss_module, batches, validation: tuple, run: RunLog,
           stop: StopRequest, bar, target: int, saved_at: int | None) -> tuple[bool, int | None]:
    """Train until `target` episodes, the end of the data, or a stop request (checked between steps, agreed
    by all processes); returns (stopped by request, episode count last saved)."""
    cfg, ctx, device = session.cfg, session.ctx, session.device
    steps, window_start, window_episodes = [], time.perf_counter(), 0   # (losses, gradient norms) per step
    while state.episodes_done < target:
        keys, batch, offset = next(batches, (None, None, 0))
        total, smallest, stopping = distributed.step_totals(ctx, len(keys) if keys else 0, stop.requested, device)
        if stopping or smallest == 0:
            return stopping, saved_at
        used = min(total, cfg.num_episodes - state.episodes_done) if not ctx.active else total
        if used < total:  # the last batch stops exactly at --num_episodes (one process only)
            batch = batch.take(used)
        before = state.episodes_done
        steps.append(train_step(state, loss_module, batch.to(device, non_blocking=True), cfg, used))
        advance_position(state, offset, used, len(keys), ctx.active)
        window_episodes += used
        bar.update(used)
        if crossed(before, state.episodes_done, cfg.val_every) or state.episodes_done >= target:
            if ctx.is_main:
                val_records, tokenizer = validation
                state.last_val = validate(state.model, [val_records], tokenizer, cfg, device)[0]
                rate = window_episodes / (time.perf_counter() - window_start)
                losses, norms = zip(*steps)
                run.record(state, rate, mean_per_model(losses)[0], bar, [float(n[0]) for n in norms])
            steps, window_start, window_episodes = [], time.perf_counter(), 0
        if crossed(before, state.episodes_done, cfg.checkpoint_every) or state.episodes_done >= target:
            saved_at = save(state, session, run)
    return False, saved_at
