"""Training throughput of stacks of seeds (`train --seeds`): episodes/s summed over the models, the step alone.

    python benchmarks/stacks.py [--types ME scan_prim_augmentation] [--sizes 1 8 16 64] [--device cuda]
                                [--steps 20] [--threads N]

For each type and stack size M it builds M models as `train --seeds 0..M-1` does (one store, each model its
own data order), times optimizer steps of the stack after a warm-up (no validation, no start-up), and counts
the FLOPs on valid tokens (benchmarks/flops.py) against the fp32 matmul peak measured here with the same
threads. fp32 without TF32 on a GPU, as `train` runs. For us against the original, see compare.py --parts stacks.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import read_cpu_info, threads_arg  # noqa: E402
from pipeline import threads  # noqa: E402

threads.apply(threads_arg(sys.argv[1:]))  # before torch loads

import torch  # noqa: E402

from flops import matmul_peak_flops, train_flops  # noqa: E402
from pipeline import store as episode_store  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data import StackStream, StreamConfig, Tokenizer  # noqa: E402
from trainer.precision import use_exact_fp32  # noqa: E402
from trainer.model import stack_models  # noqa: E402
from trainer.state import TrainState, build_state  # noqa: E402
from trainer.step import train_step  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def stack_state(cfg: TrainConfig, manifest: dict, seeds: range, device: torch.device) -> TrainState:
    models = [build_state(TrainConfig(**{**vars(cfg), "seed": s}), manifest, device).model for s in seeds]
    stack = stack_models(models)
    stack.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    state = TrainState(stack, torch.optim.Adam(stack.parameters(), lr=cfg.lr, fused=True))
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda _: 1.0)
    return state


def bench(episode_type: str, size: int, steps: int, device: torch.device, root: Path) -> dict:
    store = episode_store.generate(episode_store.GenerateConfig(
        episode_type=episode_type, num_episodes=steps + 5, out=str(root / f"{episode_type}-{size}"), progress=False))
    manifest = episode_store.load_manifest(store)
    cfg = TrainConfig(episode_type=episode_type, store=str(store))
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    shards = tuple(str(p) for p in episode_store.shard_paths(store, "train"))
    streams = [StreamConfig(shards, 1, tokenizer, seed=s, by_node=False) for s in range(size)]
    batches = [batch for _, batch in StackStream(streams)]
    state = stack_state(cfg, manifest, range(size), device)
    for batch in batches[:3]:  # warm-up
        train_step(state, state.model.loss, batch.to(device), cfg, 1)
    sync(device)
    start = time.perf_counter()
    for batch in batches[3:3 + steps]:
        train_step(state, state.model.loss, batch.to(device), cfg, 1)
    sync(device)
    seconds = time.perf_counter() - start
    model_cfg = state.model.cfg
    flops = sum(int(train_flops(b, model_cfg).sum()) for b in batches[3:3 + steps])
    return {"episodes_per_s": round(size * steps / seconds, 2), "valid_gflop_s": round(flops / seconds / 1e9, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["ME", "scan_prim_augmentation"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the project's policy)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    use_exact_fp32(device)
    peak = matmul_peak_flops(device) / 1e9
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else read_cpu_info(),
              "torch_threads": torch.get_num_threads(), "fp32_matmul_peak_gflop_s": round(peak, 1), "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for episode_type in args.types:
            rows = {m: bench(episode_type, m, args.steps, device, Path(tmp)) for m in args.sizes}
            for row in rows.values():
                row["fraction_of_peak"] = round(row["valid_gflop_s"] / peak, 3)
            report["results"][episode_type] = rows
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
