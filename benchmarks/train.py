"""Training throughput (episodes/s) and achieved FLOP/s of the training step alone, printed as JSON.

    python benchmarks/train.py [--types ME scan_prim_augmentation] [--batch_sizes 8] [--device cpu] [--threads N]

For each type it generates a small store in a temp dir, streams it with the real loader and times optimizer
steps after a warm-up (no validation, no start-up: for us against the original, see compare.py). FLOPs are
counted on valid tokens only (benchmarks/flops.py); the machine's fp32 matmul peak is measured here too,
with the same threads, so the fraction is of this machine, not a datasheet.
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
from trainer.data import StreamConfig, Tokenizer, make_loader  # noqa: E402
from trainer.precision import use_exact_fp32  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.state import build_state, model_config  # noqa: E402
from trainer.step import train_step  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_type(episode_type: str, batch_size: int, steps: int, workers: int, device: torch.device,
               root: Path, amp: str = "none") -> dict:
    n_episodes = batch_size * (steps + 5)
    store = episode_store.generate(episode_store.GenerateConfig(
        episode_type=episode_type, num_episodes=n_episodes, shard_size=max(1, n_episodes // 4),
        out=str(root), progress=False))
    manifest = episode_store.load_manifest(store)
    cfg = TrainConfig(episode_type=episode_type, batch_size=batch_size, store=str(store), workers=workers, amp=amp)
    state = build_state(cfg, manifest, device)
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    stream = StreamConfig(tuple(str(p) for p in episode_store.shard_paths(store, "train")), batch_size,
                          tokenizer, workers=workers)
    batches = iter(make_loader(stream, pin_memory=device.type == "cuda"))
    loss_module = lambda b: state.model.loss(b)  # noqa: E731
    for _ in range(3):  # warm-up
        batch = next(batches)[1].to(device)
        train_step(state, loss_module, batch, cfg, batch.num_episodes)
    sync(device)
    start, done, flops = time.perf_counter(), 0, 0
    for _ in range(steps):
        keys, batch = next(batches)
        train_step(state, loss_module, batch.to(device, non_blocking=True), cfg, batch.num_episodes)
        done += len(keys)
        flops += int(train_flops(batch, model_config(cfg, manifest)).sum())
    sync(device)
    seconds = time.perf_counter() - start
    return {"episode_type": episode_type, "batch_size": batch_size, "amp": amp, "episodes_per_s": round(done / seconds, 2),
            "valid_gflop_per_episode": round(flops / done / 1e9, 3), "achieved_gflop_s": round(flops / seconds / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=["ME", "scan_prim_augmentation"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[8])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--amp", nargs="+", default=["none"], choices=["none", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="[default: pipeline.threads' policy]")
    args = parser.parse_args()
    device = torch.device(args.device)
    use_exact_fp32(device)  # what `train` computes: fp32 without cuDNN's TF32
    peak = matmul_peak_flops(device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for episode_type in args.types:
            for batch_size in args.batch_sizes:
                for amp in args.amp:
                    row = bench_type(episode_type, batch_size, args.steps, args.workers, device,
                                     Path(tmp) / f"{batch_size}-{amp}", amp)
                    row["fraction_of_matmul_peak"] = round(row["achieved_gflop_s"] * 1e9 / peak, 4)
                    results.append(row)
    print(json.dumps({"device": str(device), "cpu": read_cpu_info(), "threads": threads.applied(),
                      "fp32_matmul_peak_gflop_s": round(peak / 1e9, 1), "results": results}, indent=1))


if __name__ == "__main__":
    main()
