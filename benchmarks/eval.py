"""Wall time of `python cli.py eval --split addprim_jump` (all 7,706 queries), printed as JSON.

    python benchmarks/eval.py [--repeats 3] [--trained_episodes N] [--chunk_sizes 256 512 1024 2048]

Checkpoints are paper size (E=200, 2 layers), scan_prim_augmentation, timed through the real CLI in a
subprocess, start-up included:
  untrained:       one optimizer step; it never emits EOS, so every query runs all 50 steps (the worst case).
  untrained_max16: the same with --max_length_eval 16: as many decoder steps in all as a model that stops
                   at the right length (the test targets average 14.8 actions + EOS), i.e. the usual case.
  trained:         (--trained_episodes N > 0) a briefly trained model. Not cheap on a CPU (about 2.5
                   episodes/s at this size), and 480 episodes still do not emit EOS; off by default.
`--also_spinning` adds the untrained case with libgomp's default spinning waits (GOMP_SPINCOUNT=300000), which
`cli.py eval` shortens to 1000 by default. `--chunk_sizes` also times the decoding alone, in this process, for
each chunk size (how DEFAULT_CHUNK_SIZE was chosen), with the same OpenMP setting as the CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import threads_arg  # noqa: E402
from pipeline import threads  # noqa: E402

threads.apply(threads_arg(sys.argv[1:]))  # as `cli.py eval` does, before torch loads

from pipeline import store as episode_store  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import train  # noqa: E402

EPISODE_TYPE = "scan_prim_augmentation"


def make_checkpoint(root: Path, store: Path, name: str, episodes: int, batch_size: int) -> Path:
    cfg = TrainConfig(episode_type=EPISODE_TYPE, store=str(store), num_episodes=episodes, batch_size=batch_size,
                      lr=2e-3, workers=0, progress=False, dir_model=str(root), fn_out_model=name,
                      val_every=10 ** 9, checkpoint_every=10 ** 9)
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines would spoil the JSON on stdout
        return Path(train(cfg)["checkpoint"])


def time_cli(checkpoint: Path, out: Path, repeats: int, extra: tuple[str, ...] = (), env: dict | None = None) -> dict:
    walls, decodes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "eval", "--checkpoint", str(checkpoint),
                        "--split", "addprim_jump", "--out", str(out), "--no_progress", *extra],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        walls.append(time.perf_counter() - start)
        decodes.append(json.loads((out / "results.json").read_text())["splits"]["addprim_jump"]["decode_seconds"])
    split = json.loads((out / "results.json").read_text())["splits"]["addprim_jump"]
    lengths = [len(json.loads(line)["prediction"].split()) for line in open(out / "predictions_addprim_jump.jsonl")]
    return {"wall_seconds": [round(w, 2) for w in walls], "wall_median": round(statistics.median(walls), 2),
            "decode_seconds": decodes, "n": split["n"], "accuracy": split["accuracy"],
            "mean_output_length": round(statistics.mean(lengths), 2)}


def time_chunks(checkpoint: Path, chunk_sizes: list[int], repeats: int) -> dict:
    from evalsuite.decode import decode_shared_support
    from evalsuite.evaluate import EvalConfig, load_model, prepare_split
    from trainer.checkpoint import load_checkpoint
    cfg = EvalConfig(checkpoint=str(checkpoint), device="cpu")
    loaded = load_model(load_checkpoint(checkpoint), cfg)
    episode = prepare_split("addprim_jump", loaded, cfg).episodes[0]
    times = {}
    for size in chunk_sizes:
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            decode_shared_support(loaded.model, episode.support_ids, episode.query_ids, loaded.max_length,
                                  loaded.device, chunk_size=size)
            runs.append(time.perf_counter() - start)
        times[str(size)] = [round(r, 2) for r in runs]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trained_episodes", type=int, default=0, help="0: skip the trained checkpoint")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--chunk_sizes", type=int, nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=None, help="[default: pipeline.threads' policy]")
    parser.add_argument("--also_spinning", action="store_true",
                        help="also time the untrained case with libgomp's default GOMP_SPINCOUNT=300000")
    args = parser.parse_args()
    import torch
    report = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = episode_store.generate(episode_store.GenerateConfig(
            episode_type=EPISODE_TYPE, num_episodes=max(args.batch_size, args.trained_episodes),
            out=str(root / "shards"), progress=False))
        checkpoints = {"untrained": make_checkpoint(root, store, "untrained.pt", args.batch_size, args.batch_size)}
        if args.trained_episodes:
            checkpoints["trained"] = make_checkpoint(root, store, "trained.pt", args.trained_episodes,
                                                     args.batch_size)
        for name, path in checkpoints.items():
            report[name] = time_cli(path, root / f"eval_{name}", args.repeats)
        report["untrained_max16"] = time_cli(checkpoints["untrained"], root / "eval_max16", args.repeats,
                                             ("--max_length_eval", "16"))
        if args.also_spinning:
            report["untrained_spin300000"] = time_cli(checkpoints["untrained"], root / "eval_spin", args.repeats,
                                                      env={"GOMP_SPINCOUNT": "300000"})
        if args.chunk_sizes:
            report["decode_seconds_by_chunk_size"] = time_chunks(checkpoints["untrained"], args.chunk_sizes,
                                                                 args.repeats)
    report["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
