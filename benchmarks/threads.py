"""Thread settings against each other, on a quiet CPU and beside a competing CPU-bound job; prints JSON.

    python benchmarks/threads.py [--types ME scan_prim_augmentation] [--seconds 15] [--repeats 1]
                                 [--conditions quiet busy busy_niced]

For each episode type (at its default batch size), condition and setting, a fresh process (this script with
--child) applies the setting through pipeline.threads, imports torch and times optimizer steps of the
paper-size model (fp32) on batches streamed by the real loader from a small store: 3 warm-up steps, then as
many steps as fit in --seconds (at least 2). Each measurement is bounded in time and excludes start-up.

Conditions:
  quiet       nothing started by this script (load_average_before in the JSON shows whether the machine was).
  busy        one competing CPU-bound process (a Python busy loop, started before the measured process and
              stopped after it; it also ends by itself).
  busy_niced  the same, with the measured process at nice 15: a polite job on a shared machine (the slow
              case: 0.8 episodes/s with libgomp's default waiting, 20.8 with one thread).
  busy_later  the competing process starts after the measured one has started and warmed up on a quiet
              machine, just before the timed steps: the adaptive default chose the quiet setting, and a run
              keeps its thread count to its end (its rounding depends on it), as train does.
Settings: "default" (what pipeline.threads picks when no OMP_* variable is set: the adaptive policy, which
measures the other processes' load as it starts; its choice is in the JSON), one thread, and all usable
cores with the short spin (GOMP_SPINCOUNT=1000, the fixed policy before the adaptive one), with libgomp's own
spinning wait (GOMP_SPINCOUNT=300000) or with OMP_WAIT_POLICY=passive.
The summary gives, per type and condition, the best setting and how many times slower the default is than
it; the target is at most 1.5x everywhere ("ok").
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

from machine import competing_job, load_average, read_cpu_info  # noqa: E402
from pipeline import threads  # noqa: E402

TARGET_SLOWDOWN = 1.5
POLICY_VARS = (*threads.THREAD_VARS, threads.SPIN_VAR, threads.WAIT_POLICY_VAR)
NICE_FOR_NICED = 15


def settings(cores: int) -> dict[str, dict[str, str]]:
    """Setting name -> the OMP variables the measured process starts with (its own apply() adds the rest)."""
    n = str(cores)
    named = {"default": {}, "threads=1": {"OMP_NUM_THREADS": "1"},
             f"threads={n} spin=1000": {"OMP_NUM_THREADS": n, threads.SPIN_VAR: threads.SHORT_SPINCOUNT},
             f"threads={n} spin=300000": {"OMP_NUM_THREADS": n, threads.SPIN_VAR: "300000"},
             f"threads={n} passive": {"OMP_NUM_THREADS": n, threads.WAIT_POLICY_VAR: "passive"}}
    if cores > 2:
        named[f"threads={cores // 2}"] = {"OMP_NUM_THREADS": str(cores // 2)}
    return named


def child_env(setting: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARS}
    return {**env, **setting}


def measure(episode_type: str, store: Path, setting: dict[str, str], seconds: float, niced: bool,
            busy: bool | str) -> dict:
    """busy: False, True (a competing job throughout), or "later" (the child starts it before its timed steps)."""
    cmd = [sys.executable, __file__, "--child", "--types", episode_type, "--store", str(store),
           "--seconds", str(seconds), *(["--busy_later"] if busy == "later" else [])]
    timeout = 10 * seconds + 120  # the collapsed cases are slow, but never unbounded
    preexec = (lambda: os.nice(NICE_FOR_NICED)) if niced else None
    with competing_job(timeout + 10) if busy is True else contextlib.nullcontext():
        try:
            done = subprocess.run(cmd, env=child_env(setting), capture_output=True, text=True, timeout=timeout,
                                  preexec_fn=preexec, check=True)
        except subprocess.TimeoutExpired:
            return {"episodes_per_s": None, "error": f"timed out after {timeout:.0f} s"}
        except subprocess.CalledProcessError as err:
            return {"episodes_per_s": None, "error": err.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(args) -> None:
    """In the measured process: the policy from the environment, then torch, then timed steps."""
    applied = threads.apply(None)
    import torch
    from pipeline import store as episode_store
    from trainer.data import StreamConfig, Tokenizer, make_loader
    from trainer.config import TrainConfig
    from trainer.state import build_state
    from trainer.step import train_step
    episode_type = args.types[0]
    cfg = TrainConfig(episode_type=episode_type, store=args.store)
    manifest = episode_store.load_manifest(Path(args.store))
    state = build_state(cfg, manifest, torch.device("cpu"))
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    shards = tuple(str(p) for p in episode_store.shard_paths(args.store, "train"))

    def batches():
        for epoch in range(10 ** 6):  # more episodes than the store holds: another epoch
            yield from make_loader(StreamConfig(shards, cfg.batch_size, tokenizer, epoch=epoch, workers=cfg.workers))

    stream, loss = batches(), (lambda b: state.model.loss(b))
    for _ in range(3):
        batch = next(stream)[1]
        train_step(state, loss, batch, cfg, batch.num_episodes)
    with competing_job(10 * args.seconds + 60) if args.busy_later else contextlib.nullcontext():
        start, steps, episodes = time.perf_counter(), 0, 0
        while steps < 2 or time.perf_counter() - start < args.seconds:
            keys, batch = next(stream)
            train_step(state, loss, batch, cfg, batch.num_episodes)
            steps, episodes = steps + 1, episodes + len(keys)
        seconds = time.perf_counter() - start
    print(json.dumps({"episodes_per_s": round(episodes / seconds, 2), "steps": steps, "batch_size": cfg.batch_size,
                      "seconds": round(seconds, 1), "torch_threads_at_end": torch.get_num_threads(), **applied}))


def summarize(results: list[dict]) -> list[dict]:
    """Per (type, condition): median rate per setting, the best setting, and default's slowdown against it."""
    groups: dict[tuple, dict[str, list]] = {}
    for row in results:
        rates = groups.setdefault((row["episode_type"], row["condition"]), {})
        rates.setdefault(row["setting"], []).append(row["episodes_per_s"] or 0.0)
    summary = []
    for (episode_type, condition), rates in groups.items():
        medians = {name: statistics.median(values) for name, values in rates.items()}
        best = max(medians, key=medians.get)
        default = medians.get("default", 0.0)
        slowdown = medians[best] / default if default > 0 else float("inf")
        summary.append({"episode_type": episode_type, "condition": condition, "episodes_per_s": medians,
                        "best": best, "default_slowdown": round(slowdown, 2),
                        "ok": slowdown <= TARGET_SLOWDOWN})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=["ME", "scan_prim_augmentation"])
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per measurement")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--conditions", nargs="+", default=["quiet", "busy", "busy_niced", "busy_later"],
                        choices=["quiet", "busy", "busy_niced", "busy_later"])
    parser.add_argument("--busy_later", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store_episodes", type=int, default=2000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    from pipeline import store as episode_store
    cores = threads.usable_cores()
    report = {"cpu": read_cpu_info(), "usable_cores": cores, "seconds": args.seconds,
              "default_policy": threads.thread_env(None, environ={}), "load_average_before": load_average()}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for episode_type in args.types:
            store = episode_store.generate(episode_store.GenerateConfig(
                episode_type, num_episodes=args.store_episodes, out=tmp, progress=False))
            named = settings(cores)
            for repeat in range(args.repeats):
                for condition in args.conditions:
                    order = list(named)[repeat % len(named):] + list(named)[:repeat % len(named)]
                    for name in order:  # alternating, so a drift in the machine's load spreads over all
                        busy = {"quiet": False, "busy_later": "later"}.get(condition, True)
                        row = measure(episode_type, store, named[name], args.seconds,
                                      niced=condition == "busy_niced", busy=busy)
                        results.append({"episode_type": episode_type, "condition": condition, "setting": name,
                                        "repeat": repeat, **row})
                        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    summary = summarize(results)
    report.update(load_average_after=load_average(), results=results, summary=summary,
                  max_default_slowdown=max(s["default_slowdown"] for s in summary), target=TARGET_SLOWDOWN,
                  ok=all(s["ok"] for s in summary))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
