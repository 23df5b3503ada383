"""Do two revisions of the code train the same runs, bit for bit? Prints JSON.

    python benchmarks/same_runs.py --before REV [--after REV] [--experiments ME,scan_length]
                                   [--variants full,no_memory] [--episodes 200] [--out DIR]

Each revision is checked out into a temporary git worktree (`--after` defaults to the working tree itself),
and each (experiment, variant) is trained there from the same store, as `reproduce` trains a run (`cli.py
train --threads 1`, one process, seed 0), for half of `--episodes`, then extended by `--resume` to all of them. The
checkpoints' weights, Adam moments and episode counts must be equal exactly (torch.equal), and so must the
metrics logs' losses. A refactor that must not move the science runs this against the revision before it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANT_FLAGS = {"full": [], "no_memory": ["--disable_memory"], "no_attention": ["--disable_attention"],
                 "no_support_loss": ["--disable_recon_loss"]}


@contextlib.contextmanager
def checkout(rev: str | None):
    """A worktree at `rev` (removed afterwards), or this checkout as it is when rev is None."""
    if rev is None:
        yield ROOT
        return
    folder = Path(tempfile.mkdtemp(prefix="same-runs-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(folder), rev], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=True)


def cli(code: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "1000"}
    result = subprocess.run([sys.executable, "-m", "cli", *args], cwd=code, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"{code}: cli.py {' '.join(args[:3])} failed: {result.stderr.strip()[-500:]}")


def train_run(code: Path, store: Path, out: Path, experiment: str, variant: str, episodes: int) -> Path:
    """Half the episodes, then a resume to all of them (a grid's runs are resumed across sessions)."""
    flags = ["--store", str(store), "--dir_model", str(out), "--seed", "0", "--threads", "1", "--no_progress",
             "--val_every", "50", "--checkpoint_every", "50", *VARIANT_FLAGS[variant]]
    cli(code, "train", *flags, "--num_episodes", str(episodes // 2))
    cli(code, "train", *flags, "--num_episodes", str(episodes), "--resume")  # extended, as a resumed run is
    return out / f"net_{experiment}.pt"


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two checkpoints: weights, Adam's state, episode counts, logged losses."""
    x, y = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    found = [f"model.{k}" for k in x["model"] if not torch.equal(x["model"][k], y["model"][k])]
    for k, state in x["optimizer"]["state"].items():
        other = y["optimizer"]["state"][k]
        found += [f"optimizer.{k}.{n}" for n in state if not torch.equal(state[n], other[n])]
    found += [key for key in ("episodes_done", "steps") if x[key] != y[key]]
    losses = [[json.loads(line)["loss"] for line in p.with_suffix(".metrics.jsonl").read_text().splitlines()]
              for p in (a.parent / a.stem, b.parent / b.stem)]
    return found + (["metrics.loss"] if losses[0] != losses[1] else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=None, help="a revision  [default: the working tree]")
    parser.add_argument("--experiments", default="ME,scan_prim_permutation,scan_prim_augmentation,"
                                                 "scan_around_right,scan_length")
    parser.add_argument("--variants", default="full")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="same-runs-out-"))
    results = []
    for experiment in args.experiments.split(","):
        store = work / "stores" / experiment
        cli(ROOT, "generate", "--episode_type", experiment, "--num_episodes", str(args.episodes), "--store",
            str(store), "--no_progress")
        for variant in args.variants.split(","):
            paths = []
            for side, rev in (("before", args.before), ("after", args.after)):
                with checkout(rev) as code:
                    paths.append(train_run(code, store, work / side / experiment / variant, experiment, variant,
                                           args.episodes))
            found = differences(*paths)
            results.append({"experiment": experiment, "variant": variant, "episodes": args.episodes,
                            "bitwise_equal": not found, "differences": found[:10]})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"before": args.before, "after": args.after or "working tree", "runs": results}, indent=2))
    if not all(r["bitwise_equal"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
