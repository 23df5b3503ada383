"""The training loop of a run's M models: `train` (one model) and `train --seeds` (a stack) both run it.

A run trains one model of M members (trainer/model.py): a single run is one member, a stack one per seed. Each
member is an ordinary single run on disk, with its own config, checkpoint, metrics log and curve; a stack keeps
its members' states in step with the stacked model when it saves.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.errors import UserError
from trainer import distributed
from trainer.checkpoint import save_checkpoint
from trainer.config import TrainConfig
from trainer.data import Tokenizer
from trainer.model import model_slice
from trainer.runlog import RunLog, _fmt, crossed, log_line
from trainer.signals import StopRequest, TrainingInterrupted
from trainer.state import Session, TrainState, advance_position, checkpoint_payload
from trainer.step import mean_per_model, train_step, validate


@dataclass
class Member:
    """One model of a run as a single run: its config, checkpoint state (the run's own state for a single run,
    synchronised from the stack when a stack saves), store and validation episodes, dropout generator (None:
    the global one) and metrics log."""
    cfg: TrainConfig
    state: TrainState
    session: Session
    val_records: list[dict]
    generator: torch.Generator | None
    log: RunLog | None = None


@dataclass
class Run:
    cfg: TrainConfig                 # the run's settings: the single run's, or the stack's
    ctx: distributed.DistContext     # the processes that train this model together (a stack trains alone)
    device: torch.device
    state: TrainState                # the model of M members, its optimizer, lr schedule and data position
    members: list[Member]
    loss_module: Callable            # batch -> (M,) losses
    tokenizer: Tokenizer

    @property
    def stacked(self) -> bool:
        return bool(self.cfg.seeds)


def loop(run: Run, batches: Iterator) -> None:
    """Train from `batches` ((keys, batch, offset in its loader batch), as resumed_batches gives; a stack's keys
    are each model's) until --num_episodes, --stop_after, the end of the data, or SIGINT / SIGTERM (then save
    and raise TrainingInterrupted)."""
    cfg, state = run.cfg, run.state
    target = min(cfg.num_episodes, cfg.stop_after or cfg.num_episodes)
    bar = tqdm(total=cfg.num_episodes, initial=state.episodes_done, unit="ep", dynamic_ncols=True,
               disable=not (run.ctx.is_main and cfg.progress))
    saved_at = state.episodes_done if cfg.resume else None
    try:
        with StopRequest() as stop:
            stopped, saved_at = _steps(run, batches, stop, bar, target, saved_at)
    finally:
        batches.close()  # the loader's workers end now, not at interpreter exit
        bar.close()
    if stopped and state.episodes_done < target:
        if state.episodes_done not in (saved_at, 0):
            saved_at = save(run)
        where = Path(cfg.dir_model) if run.stacked else cfg.checkpoint_path
        raise TrainingInterrupted(state.episodes_done, cfg.num_episodes, where if saved_at is not None else None,
                                  run.ctx.is_main)
    if state.episodes_done < target:
        raise UserError(f"the store ran out after {state.episodes_done} episodes, before {target}")


def _steps(run: Run, batches: Iterator, stop: StopRequest, bar, target: int,
           saved_at: int | None) -> tuple[bool, int | None]:
    """Train until `target` episodes, the end of the data, or a stop request (checked between steps, agreed
    by all processes); returns (stopped by request, episode count last saved)."""
    cfg, ctx, state, M = run.cfg, run.ctx, run.state, len(run.members)
    steps, window_start, window_episodes = [], time.perf_counter(), 0   # (losses, gradient norms) per step
    while state.episodes_done < target:
        keys, batch, offset = next(batches, (None, None, 0))
        available = 0 if keys is None else len(keys[0]) if run.stacked else len(keys)   # episodes of each model
        total, smallest, stopping = distributed.step_totals(ctx, available, stop.requested, run.device)
        if stopping or smallest == 0:
            return stopping, saved_at
        used = min(total, cfg.num_episodes - state.episodes_done) if not ctx.active else total
        if used < total:  # the last step stops exactly at --num_episodes (one process only)
            batch = take_per_model(batch, M, available, used)
        before = state.episodes_done
        steps.append(train_step(state, run.loss_module, batch.to(run.device, non_blocking=True), cfg, used))
        advance_position(state, offset, used, available, ctx.active)
        window_episodes += used * M
        bar.update(used)
        if crossed(before, state.episodes_done, cfg.val_every) or state.episodes_done >= target:
            if ctx.is_main:
                record(run, steps, window_episodes / (time.perf_counter() - window_start), bar)
            steps, window_start, window_episodes = [], time.perf_counter(), 0
        if crossed(before, state.episodes_done, cfg.checkpoint_every) or state.episodes_done >= target:
            saved_at = save(run)
    return False, saved_at


def take_per_model(batch, M: int, per_model: int, used: int):
    """The first `used` episodes of each model's `per_model` in a model-major batch."""
    keep = torch.arange(M * per_model).view(M, per_model)[:, :used].reshape(-1)
    return type(batch)(**{name: value[keep] for name, value in vars(batch).items()})


def record(run: Run, steps: list, rate: float, bar) -> None:
    """Validate every member, and log its row: the mean loss and the gradient norms since the last row."""
    losses, norms = zip(*steps)
    means, norms = mean_per_model(losses), torch.stack(norms).t().tolist()
    scores = validate(run.state.model, [m.val_records for m in run.members], run.tokenizer, run.cfg, run.device)
    lr = run.state.optimizer.param_groups[0]["lr"]
    for member, loss, member_norms, val in zip(run.members, means, norms, scores):
        member.state.episodes_done, member.state.last_val = run.state.episodes_done, val
        member.log.record_row(member.state, rate, loss, lr, stack_models=len(run.members), grad_norms=member_norms)
    if run.stacked:
        gen = " ".join(f"{m.cfg.seed}:{_fmt(v['generalization'])}" for m, v in zip(run.members, scores))
        message = (f"episode {run.state.episodes_done} | {rate:.1f} episodes/s (all models) | loss "
                   f"{sum(means) / len(means):.4f} (mean) | val generalization by seed {gen}")
    else:
        message = log_line(run.state, rate, means[0])
    print(message, flush=True) if bar.disable else bar.write(message)  # above the progress bar


def save(run: Run) -> int:
    """Rank 0 writes each member's checkpoint (atomically) and redraws its curve; returns the episode count saved."""
    if run.ctx.is_main:
        optimizer_state = run.state.optimizer.state_dict()  # once per save: each member takes its slice
        for m, member in enumerate(run.members):
            if member.state is not run.state:
                sync_member(member, m, run.state, optimizer_state)
            payload = checkpoint_payload(member.state, member.session)
            if member.generator is not None:  # a stack's model draws its dropout from its own generator
                on_cuda = member.session.device.type == "cuda"
                payload["rng"] = {"torch": torch.get_rng_state() if on_cuda else member.generator.get_state(),
                                  "cuda": member.generator.get_state() if on_cuda else None}
            member.log.draw()
            save_checkpoint(member.cfg.checkpoint_path, payload)
    return run.state.episodes_done


def sync_member(member: Member, m: int, stack: TrainState, full: dict) -> None:
    """Copy model m's slice of the stack (weights, Adam moments `full`, schedule, position) into its single state."""
    member.state.model.load_state_dict(stack.model.model_state_dict(m))
    M = stack.model.num_models
    sliced = {k: {"step": v["step"].clone(), **{name: model_slice(v[name], m, M).clone()
                                                 for name in ("exp_avg", "exp_avg_sq")}}
              for k, v in full["state"].items()}
    member.state.optimizer.load_state_dict({"state": sliced, "param_groups": full["param_groups"]})
    member.state.scheduler.load_state_dict(stack.scheduler.state_dict())
    for name in ("episodes_done", "steps", "batches", "partial"):
        setattr(member.state, name, getattr(stack, name))
