"""`train --seeds`: M independent runs trained as one stack (a model of M members, trainer/model.py), in one
process, through the loop of a single run (trainer/loop.py).

Model m is the run that `train --seed m` would make: the same initial weights (bitwise), the same store and
data order, the same dropout stream (its own generator, drawn over its own tokens), its own Adam moments and
gradient clip, the same lr schedule; a stack of one is its single run bit for bit on the CPU. Each model writes an ordinary single-run checkpoint, metrics log and
curve under DIR_MODEL/seed<m>/, with the train_config of that single run: `eval`, `predict` and a single
`--resume` take it unchanged, and a stack resumes from its M checkpoints.

Under torchrun the seeds are split over the processes; each trains its share as a stack of its own, with no
gradient averaging between different models.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import torch

from pipeline import provenance
from pipeline import store as episode_store
from pipeline.errors import UserError
from trainer import distributed
from trainer.checkpoint import claim_checkpoint
from trainer.config import SEED_FIELD, TrainConfig, check_checkpoint_target, check_config, recipe, with_store_episode_type
from trainer.data import StreamConfig, Tokenizer, make_stack_loader, read_records
from trainer.device import device_name, requested_device, resolve_device
from trainer.model import MetaSeq2Seq, stack_models, stack_weights
from trainer.precision import use_exact_fp32
from trainer.runlog import RunLog
from trainer.state import Session, TrainState, build_state, lr_schedule, restore, resumed_batches
from trainer.loop import Member, Run, loop
from trainer.stores import prepare_store, train_shards



def member_config(cfg: TrainConfig, seed: int) -> TrainConfig:
    """The single run that model `seed` of the stack is: its seed, store and run folder."""
    store = cfg.store.replace(SEED_FIELD, str(seed)) if cfg.store else None
    return replace(cfg, seed=seed, seeds=None, store=store, dir_model=str(Path(cfg.dir_model) / f"seed{seed}"))


def seeds_of_rank(seeds: tuple[int, ...], ctx: distributed.DistContext) -> tuple[int, ...]:
    share = seeds[ctx.rank::ctx.world_size]
    if not share:
        raise UserError(f"{ctx.world_size} processes for {len(seeds)} seed(s): give at least as many --seeds as "
                        "processes")
    return share


def check_stack(cfg: TrainConfig, members: list[TrainConfig], device_type: str) -> None:
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"--seeds lists a seed twice: {','.join(map(str, cfg.seeds))}")
    if cfg.workers > 1:
        raise UserError("--workers: a stack reads its models' streams in one loader process; use 0 or 1")
    if cfg.amp != "none" or cfg.compile:
        raise UserError("--seeds trains with its own batched recurrence, in fp32: leave out --amp and --compile")
    for member in members:
        check_config(member, 1, device_type)


def build_member(cfg: TrainConfig, device: torch.device, resume: bool) -> Member:
    manifest = prepare_store(cfg, distributed.DistContext())
    session = Session(cfg, distributed.DistContext(), device, manifest, episode_store.manifest_sha256(cfg.store_path),
                      provenance.collect(device_name(device)))
    state = build_state(cfg, manifest, device)  # torch.manual_seed(seed), then the model: its initial weights
    if resume:
        restore(state, cfg, session.manifest_hash, 1)
    generator = torch.Generator(device=device)
    if device.type == "cuda":  # a single run draws dropout from the CUDA generator, untouched by the CPU init
        generator.set_state(torch.cuda.get_rng_state(device) if resume else
                            torch.Generator(device=device).manual_seed(cfg.seed).get_state())
    else:
        generator.set_state(torch.get_rng_state())
    val = read_records(episode_store.shard_paths(cfg.store_path, "val"))
    return Member(cfg, state, session, val, generator)


def check_in_step(members: list[Member]) -> None:
    done = {m.state.episodes_done for m in members}
    positions = {(m.state.batches, m.state.partial) for m in members}
    if len(done) > 1 or len(positions) > 1:
        raise UserError(f"cannot resume the stack: its checkpoints stand at different episodes ({sorted(done)}); "
                        "resume each on its own, or train them again")


def stacked_state(members: list[Member], cfg: TrainConfig) -> TrainState:
    """The stack of the members' models, its Adam and lr schedule, at their (common) position."""
    stack = stack_models([m.state.model for m in members])
    stack.generators = [m.generator for m in members]
    first = members[0].state
    state = TrainState(stack, stack_optimizer(stack, members, cfg.lr), episodes_done=first.episodes_done,
                       steps=first.steps, batches=first.batches, partial=first.partial)
    state.scheduler = lr_schedule(state, cfg)
    state.scheduler.load_state_dict(first.scheduler.state_dict())
    return state


def stack_optimizer(stack: MetaSeq2Seq, members: list[Member], lr: float) -> torch.optim.Adam:
    """One Adam over the stacked weights: element-wise, so M Adams. Resumed moments are stacked."""
    optimizer = torch.optim.Adam(stack.parameters(), lr=lr, fused=True)
    singles = [m.state.optimizer.state_dict() for m in members]
    if singles[0]["state"]:
        state = {k: {"step": singles[0]["state"][k]["step"],
                     **{name: stack_weights([s["state"][k][name] for s in singles])
                        for name in ("exp_avg", "exp_avg_sq")}} for k in singles[0]["state"]}
        optimizer.load_state_dict({"state": state, "param_groups": singles[0]["param_groups"]})
    return optimizer


# ---- the run ------------------------------------------------------------------------------------------------

def train_stack(cfg: TrainConfig) -> dict:
    """Train the models of `cfg.seeds` that fall to this process; returns their results, keyed by seed."""
    name = requested_device(cfg.device, cfg.gpu)
    ctx = distributed.setup(resolve_device(name).type)
    try:
        device = resolve_device(name, ctx.local_rank)
        seeds = seeds_of_rank(tuple(cfg.seeds), ctx)
        if ctx.active:
            prepare_all_stores(cfg, ctx)
        return _train_stack(cfg, seeds, device, ctx)
    finally:
        distributed.teardown(ctx)


def prepare_all_stores(cfg: TrainConfig, ctx: distributed.DistContext) -> None:
    """Under torchrun, rank 0 generates every missing store of the stack (one store may serve every seed), the
    others wait: no two processes write one store."""
    if ctx.is_main:
        by_store: dict[str, TrainConfig] = {}
        for seed in cfg.seeds:  # a store shared by every seed is generated with the first seed, as without torchrun
            member = with_store_episode_type(member_config(cfg, seed))
            by_store.setdefault(str(member.store_path), member)
        for member in by_store.values():
            check_config(member, 1, "cpu")
            prepare_store(member, distributed.DistContext())
    distributed.barrier(ctx)


def _train_stack(cfg: TrainConfig, seeds: tuple[int, ...], device: torch.device, ctx) -> dict:
    members_cfg = [with_store_episode_type(member_config(cfg, s)) for s in seeds]
    if len({c.episode_type for c in members_cfg}) > 1:
        raise UserError("the stores of a stack hold different episode types: one stack holds one experiment")
    cfg = replace(cfg, episode_type=members_cfg[0].episode_type)  # and with it the default batch size and lr
    check_stack(cfg, members_cfg, device.type)
    with contextlib.ExitStack() as locks:  # one train per checkpoint, as for a single run
        for member in members_cfg:
            locks.enter_context(claim_checkpoint(member.checkpoint_path))
            check_checkpoint_target(member)
        return _run_stack(cfg, members_cfg, seeds, device)


def _run_stack(cfg: TrainConfig, members_cfg: list[TrainConfig], seeds: tuple[int, ...], device) -> dict:
    use_exact_fp32(device)
    members = [build_member(c, device, cfg.resume) for c in members_cfg]
    check_in_step(members)
    if members[0].state.episodes_done >= cfg.num_episodes:
        print(f"the stack of seeds {','.join(map(str, seeds))} is finished: {members[0].state.episodes_done} "
              "episodes trained; nothing to do", flush=True)
        return result(members)
    stack_state = stacked_state(members, cfg)
    for member in members:
        member.log = RunLog(member.cfg, True, member.state.episodes_done)
    print(stack_summary(cfg, members, device), flush=True)
    streams = stack_streams(members, cfg.batch_size, cfg.workers)
    batches = resumed_batches(make_stack_loader(streams, cfg.workers, pin_memory=device.type == "cuda"), stack_state)
    run = Run(cfg, distributed.DistContext(), device, stack_state, members, stack_state.model.loss,
              streams[0].tokenizer)
    try:
        loop(run, batches)
    finally:
        for member in members:
            member.log.close()
    return result(members)


def result(members: list[Member]) -> dict:
    return {m.cfg.seed: {"val": m.state.last_val, "episodes_done": m.state.episodes_done,
                         "checkpoint": str(m.cfg.checkpoint_path), "metrics": str(RunLog.paths(m.cfg)[0])}
            for m in members}


def stack_summary(cfg: TrainConfig, members: list[Member], device: torch.device) -> str:
    seeds = ",".join(str(m.cfg.seed) for m in members)
    start = f"resuming from episode {members[0].state.episodes_done}" if cfg.resume else "from scratch"
    rows = [("device", f"{members[0].session.provenance['device']}, threads {torch.get_num_threads()}"),
            ("stack", f"{len(members)} models (seeds {seeds}), each {cfg.batch_size} episode(s) per step"),
            ("episode type", members[0].cfg.episode_type),
            ("recipe", recipe(cfg)),
            ("stores", ", ".join(sorted({str(m.cfg.store_path) for m in members}))),
            ("lr", f"{cfg.lr:g}, x0.1 every {cfg.lr_decay_schedule} episodes seen"),
            ("episodes", f"{cfg.num_episodes} per model, {start}"),
            ("runs", f"{Path(cfg.dir_model)}/seed<k>/ (checkpoint every {cfg.checkpoint_every} episodes, "
                     f"metrics every {cfg.val_every})")]
    return "\n".join(["training stack:"] + [f"  {name:<13}{value}" for name, value in rows])


def stack_streams(members: list[Member], batch_size: int, workers: int) -> list[StreamConfig]:
    streams = []
    for member in members:
        manifest = member.session.manifest
        tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
        shards = train_shards(manifest, member.cfg.store_path, member.cfg, 1)
        streams.append(StreamConfig(shards=tuple(shards), batch_size=batch_size, tokenizer=tokenizer,
                                    support_as_queries=not member.cfg.disable_recon_loss, seed=member.cfg.seed,
                                    workers=workers, by_node=False))
    if len({s.tokenizer for s in streams}) > 1:
        raise UserError("the stores of a stack have different vocabularies: one stack holds one episode type")
    return streams
