"""`train`: M runs as one model of M members (trainer/model.py), trained by one loop (trainer/loop.py). A single
run is a stack of one; `train --seeds` stacks several seeds in one process.

Faithful to the paper's protocol: Adam, lr decayed x0.1 every `lr_decay_schedule` episodes with a fresh
Adam at each decay (unless keep_adam_at_decay), gradient-norm clip 50, masked cross-entropy, support loss.

A single run streams B episodes per step from its store, on CPU or GPU, and under torchrun averages its
gradients over the processes (DDP). In a stack, model m is the run that `train --seed m` would make: the same
initial weights, store, data order and dropout stream (its own generator), its own Adam moments and gradient
clip; a stack of one is its single run bit for bit on the CPU. Each model writes an ordinary single-run
checkpoint, metrics log and curve (a stack's under DIR_MODEL/seed<m>/): `eval`, `predict` and `--resume`
take it unchanged. Under torchrun a stack's seeds are split over the processes, with no gradient averaging
between different models.

Daily use: a run never replaces another run's checkpoint unless told (--resume / --overwrite); SIGINT and
SIGTERM finish the current step and save; a finished run can be extended by resuming with a larger
--num_episodes (the data order and the lr schedule continue as in one longer run).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import torch

from pipeline import provenance, threads
from pipeline import store as episode_store
from pipeline.errors import UserError
from trainer import distributed
from trainer.checkpoint import claim_checkpoint
from trainer.config import SEED_FIELD, TrainConfig, check_checkpoint_target, check_config, recipe, with_store_episode_type
from trainer.data import StreamConfig, Tokenizer, make_loader, make_stack_loader, read_records
from trainer.device import device_name, requested_device, resolve_device
from trainer.loop import Member, Run, loop
from trainer.model import MetaSeq2Seq, stack_models, stack_weights
from trainer.precision import use_exact_fp32
from trainer.runlog import RunLog
from trainer.state import (LossWrapper, Session, TrainState, build_state, check_resumable, lr_schedule, restore,
                           resumed_batches)
from trainer.stores import prepare_store, train_shards


def train(cfg: TrainConfig) -> dict:
    """Train, checkpoint, and return the last validation scores and where the checkpoint is: a single run's
    result, or with cfg.seeds each seed's, keyed by seed.

    Raises TrainingInterrupted (a KeyboardInterrupt) after saving, when SIGINT or SIGTERM stopped it."""
    name = requested_device(cfg.device, cfg.gpu)
    ctx = distributed.setup(resolve_device(name).type)
    try:
        device = resolve_device(name, ctx.local_rank)
        if cfg.seeds and ctx.active:
            prepare_all_stores(cfg, ctx)
        return _train(cfg, ctx, device)
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device) -> dict:
    # Every check that can fail comes before the first file is written. The first write is a checkpoint's
    # lock (one train per checkpoint); a run that fails before training leaves no new --dir_model behind.
    cfg, members, run_ctx = run_members(cfg, ctx)
    if cfg.seeds:
        check_stack(cfg, members, device.type)
    else:
        check_config(cfg, ctx.world_size, device.type)
    with contextlib.ExitStack() as locks:
        for member in members:
            if run_ctx.is_main:
                locks.enter_context(claim_checkpoint(member.checkpoint_path))
            check_checkpoint_target(member)
        return _run(cfg, members, run_ctx, device)


def run_members(cfg: TrainConfig, ctx: distributed.DistContext):
    """(the run's config, its members' single-run configs, the processes that train one model together): a
    single run is its own member, trained by every process; a stack trains this process's share of the seeds."""
    if not cfg.seeds:
        cfg = with_store_episode_type(cfg)
        return cfg, [cfg], ctx
    members = [with_store_episode_type(member_config(cfg, s)) for s in seeds_of_rank(tuple(cfg.seeds), ctx)]
    if len({c.episode_type for c in members}) > 1:
        raise UserError("the stores of a stack hold different episode types: one stack holds one experiment")
    return replace(cfg, episode_type=members[0].episode_type), members, distributed.DistContext()


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


def prepare_all_stores(cfg: TrainConfig, ctx: distributed.DistContext) -> None:
    """Under torchrun, rank 0 generates every missing store of the stack (one store may serve every seed), the
    others wait: no two processes write one store."""
    seeds_of_rank(tuple(cfg.seeds), ctx)  # a process left without seeds fails before any store is written
    if ctx.is_main:
        by_store: dict[str, TrainConfig] = {}
        for seed in cfg.seeds:  # a store shared by every seed is generated with the first seed, as without torchrun
            member = with_store_episode_type(member_config(cfg, seed))
            by_store.setdefault(str(member.store_path), member)
        for member in by_store.values():
            check_config(member, 1, "cpu")
            prepare_store(member, distributed.DistContext())
    distributed.barrier(ctx)


# ---- the run ------------------------------------------------------------------------------------------------

def _run(cfg: TrainConfig, members_cfg: list[TrainConfig], ctx: distributed.DistContext, device) -> dict:
    use_exact_fp32(device)
    members = [build_member(c, ctx, device, own_generator=bool(cfg.seeds)) for c in members_cfg]
    check_in_step(members)
    if members[0].state.episodes_done >= cfg.num_episodes:
        if ctx.is_main:
            print(finished_message(cfg, members), flush=True)
        return result(cfg, members, ctx)
    state = stacked_state(members, cfg) if cfg.seeds else members[0].state
    for member in members:
        member.log = RunLog(member.cfg, ctx.is_main, member.state.episodes_done)
    if ctx.is_main:
        print(summary(cfg, members, ctx), flush=True)
    streams = member_streams(members, cfg, ctx)
    batches = resumed_batches(run_loader(streams, cfg, device), state)
    run = Run(cfg, ctx, device, state, members, loss_module_for(state.model, cfg, ctx, device), streams[0].tokenizer)
    try:
        loop(run, batches)
    finally:
        for member in members:
            member.log.close()
    return result(cfg, members, ctx)


def build_member(cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device, own_generator: bool) -> Member:
    """A member at its start or, with --resume, where its checkpoint left off. A stack's member draws its dropout
    from its own generator, in the state that a single run's global generator would have."""
    if cfg.resume:
        check_resumable(cfg.checkpoint_path)
    manifest = prepare_store(cfg, ctx)
    session = Session(cfg, ctx, device, manifest, episode_store.manifest_sha256(cfg.store_path),
                      provenance.collect(device_name(device)) if ctx.is_main else {})
    state = build_state(cfg, manifest, device)  # torch.manual_seed(seed), then the model: its initial weights
    if cfg.resume:
        restore(state, cfg, session.manifest_hash, ctx.world_size)
    val = read_records(episode_store.shard_paths(cfg.store_path, "val"))
    return Member(cfg, state, session, val, member_generator(cfg, device) if own_generator else None)


def member_generator(cfg: TrainConfig, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if device.type == "cuda":  # a single run draws dropout from the CUDA generator, untouched by the CPU init
        generator.set_state(torch.cuda.get_rng_state(device) if cfg.resume else
                            torch.Generator(device=device).manual_seed(cfg.seed).get_state())
    else:
        generator.set_state(torch.get_rng_state())
    return generator


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


def member_streams(members: list[Member], cfg: TrainConfig, ctx: distributed.DistContext) -> list[StreamConfig]:
    """Each member's data stream: a single run's shards split over torchrun's processes, a stack's read whole."""
    streams = []
    for member in members:
        manifest = member.session.manifest
        tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
        shards = train_shards(manifest, member.cfg.store_path, member.cfg, ctx.world_size)
        streams.append(StreamConfig(shards=tuple(shards), batch_size=cfg.batch_size // ctx.world_size,
                                    tokenizer=tokenizer, support_as_queries=not member.cfg.disable_recon_loss,
                                    seed=member.cfg.seed, workers=cfg.workers, by_node=not cfg.seeds))
    if len({s.tokenizer for s in streams}) > 1:
        raise UserError("the stores of a stack have different vocabularies: one stack holds one episode type")
    return streams


def run_loader(streams: list[StreamConfig], cfg: TrainConfig, device: torch.device):
    pin_memory = device.type == "cuda"
    if cfg.seeds:
        return make_stack_loader(streams, cfg.workers, pin_memory=pin_memory)
    return make_loader(streams[0], pin_memory=pin_memory)


def loss_module_for(model, cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device):
    """What a step calls for the (M,) losses: the model (compiled with --compile), under DDP with several
    processes."""
    if cfg.seeds:
        return model.loss
    loss_module = LossWrapper(torch.compile(model) if cfg.compile else model)
    if ctx.active:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    return loss_module


def result(cfg: TrainConfig, members: list[Member], ctx: distributed.DistContext) -> dict:
    by_seed = {m.cfg.seed: {"val": m.state.last_val, "episodes_done": m.state.episodes_done,
                            "checkpoint": str(m.cfg.checkpoint_path), "metrics": str(RunLog.paths(m.cfg)[0])}
               for m in members}
    return by_seed if cfg.seeds else {**by_seed[cfg.seed], "is_main": ctx.is_main}


# ---- what it says ----------------------------------------------------------------------------------------------

def finished_message(cfg: TrainConfig, members: list[Member]) -> str:
    done = members[0].state.episodes_done
    if cfg.seeds:
        return (f"the stack of seeds {','.join(str(m.cfg.seed) for m in members)} is finished: {done} episodes "
                "trained; nothing to do")
    return (f"{cfg.checkpoint_path} is a finished run: {done} episodes trained, --num_episodes is "
            f"{cfg.num_episodes}; nothing to do (resume with a larger --num_episodes to train on)")


def thread_summary() -> str:
    policy = threads.applied()
    text = f"{torch.get_num_threads()}, GOMP_SPINCOUNT={policy.get('spincount')}"
    if policy.get("kept_from_checkpoint"):
        text += " (the count this run was trained with, kept for the whole run)"
    elif policy.get("adaptive"):
        text += f" (adaptive: other processes kept {policy['others_busy']} cores busy; kept for the whole run)"
    return text


def summary(cfg: TrainConfig, members: list[Member], ctx: distributed.DistContext) -> str:
    """The start-of-run block: what runs where, on what, and where its results go."""
    first, per_model = members[0], " per model" if cfg.seeds else ""
    start = f"resuming from episode {first.state.episodes_done}" if cfg.resume else "from scratch"
    stores = sorted({str(m.cfg.store_path) for m in members})
    rows = [
        ("device", f"{first.session.provenance['device']}, {ctx.world_size} process(es)"
                   + (", bf16 autocast" if cfg.amp == "bf16" else "")),
        ("threads", thread_summary()),
        *([("stack", f"{len(members)} models (seeds {','.join(str(m.cfg.seed) for m in members)})")]
          if cfg.seeds else []),
        ("episode type", cfg.episode_type),
        ("recipe", recipe(cfg)),
        ("store", ", ".join(stores) + ("" if cfg.seeds else f" (manifest sha256 {first.session.manifest_hash})")),
        ("batch size", f"{cfg.batch_size} episodes per step{per_model}, {cfg.workers} loader worker(s) per process"),
        ("lr", f"{cfg.lr:g}, x0.1 every {cfg.lr_decay_schedule} episodes seen"),
        ("episodes", f"{cfg.num_episodes}{per_model}, {start}"),
        ("checkpoint", f"{Path(cfg.dir_model) / 'seed<k>' if cfg.seeds else cfg.checkpoint_path} every "
                       f"{cfg.checkpoint_every} episodes and at the end"),
        ("metrics", f"every {cfg.val_every} episodes, " + ("beside each checkpoint" if cfg.seeds else
                    f"{first.log.metrics_path}; curve {first.log.plot_path}")),
    ]
    title = "training stack:" if cfg.seeds else "training run:"
    return "\n".join([title] + [f"  {name:<13}{value}" for name, value in rows])
