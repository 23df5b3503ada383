"""Us against the original code ($METASEQ2SEQ_ORIGINAL, else ../shared/original), in one run on one machine,
alternating; prints JSON.

    python benchmarks/compare.py [--quick | --full] [--threads N] [--repeats R] [--extras]
                                 [--parts generation training add_jump flops tta] [--original PATH]

Both sides run on the CPU (CUDA_VISIBLE_DEVICES= ) with the same thread settings (pipeline.threads: the
same OMP_NUM_THREADS and GOMP_SPINCOUNT), one process at a time, the two sides alternating. With
--device cuda both sides train on the GPU instead (training and tta; the other parts stay on the CPU).

- training: steady-state episodes/s of the real commands, `train.py` of the original (run from its folder)
  and our `cli.py train`, for ME and scan_prim_augmentation. Each is run for N1 and N2 episodes and the
  rate is (N2 - N1) / (T2 - T1), so start-up (imports, store verification, the end-of-run plot) cancels;
  what is left includes, on both sides, the validation every 100 episodes and, for the original, the
  episode sampling inside its loop. Ours at its default recipe (ME: 8 episodes per step, SCAN: 1) and at
  --batch_size 1 (the original's protocol: pure implementation efficiency). --extras adds ours with
  --amp bf16 (only where the CPU has native bf16) and with --compile.
- generation: episodes/s of the original's generate_episode functions (timed directly, in its folder)
  against our `generate` (written to disk, verified store), with 1 worker and with all cores.
- add_jump: wall time of the SCAN add-jump test (7,706 queries), the original's test.py against our
  `cli.py eval --split addprim_jump`, start-up included, on checkpoints trained for one episode on each side
  (effectively untrained: the original always decodes 50 steps, ours stops a chunk of queries once all have
  emitted EOS; mean_output_length says how far ours went), or on --jump_checkpoints OURS.pt ORIGINAL.tar.
- flops: training GFLOP per episode on valid tokens (benchmarks/flops.py, analytic), times each side's
  steady-state rate, against this machine's fp32 matmul peak, measured here with the same threads.
- stacks (--parts stacks): many seeds at the paper's protocol (one episode per step per model). Ours trains M
  seeds as one stack (`train --seeds`, all threads) for M in --stack_sizes; ours and the original also train
  seeds as separate runs in the best arrangement the cores allow: one process with all threads, or one
  process per core with one thread each, side by side. Grid rate = episodes/s summed over the models, from
  two lengths per model as above; each figure also as GFLOP/s on valid tokens and a fraction of the measured
  fp32 matmul peak (all threads).
- grid (--parts grid): GRID_SEEDS ME seeds of N episodes each, wall clock of the whole job: `cli.py reproduce`
  with its defaults (store generation, training, eval and the aggregate included), the same with --stacked,
  and the original's train.py for each seed, one process per core with one thread each (as many at a time
  as there are cores; its episode generation and validation are inside train.py).
- tta (--full): time to accuracy, wall clock from launch until the first validation line at the threshold
  (ME: 100% generalization), ours at the default recipe (store generation included) against the original.
--quick: tiny sizes, to check that everything runs (minutes, not figures). Where the original is absent it
prints {"skipped": reason} and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import load_average, read_cpu_info  # noqa: E402
from references import original_dir, original_missing  # noqa: E402
from pipeline import threads  # noqa: E402  (no torch here: the thread policy must come first)

DEFAULT_ORIGINAL = original_dir()  # $METASEQ2SEQ_ORIGINAL, else ../shared/original (benchmarks/references.py)
TYPES = ("ME", "scan_prim_augmentation")
JUMP_TYPE = "scan_prim_augmentation"
PARTS = ("generation", "training", "add_jump", "flops", "tta", "stacks", "grid")
SIZES = {  # training (N1, N2) per type; generation episodes (original, ours) per type; add-jump repeats
    "default": {"training": {"ME": (100, 600), JUMP_TYPE: (100, 300)}, "stacks": {"ME": (50, 150), JUMP_TYPE: (10, 30)},
                "generation": {"ME": (1000, 20000), JUMP_TYPE: (200, 20000)}, "jump_repeats": 2, "grid": 1000},
    "quick": {"training": {"ME": (10, 30), JUMP_TYPE: (2, 6)}, "stacks": {"ME": (4, 12), JUMP_TYPE: (2, 4)},
              "generation": {"ME": (50, 500), JUMP_TYPE: (10, 500)}, "jump_repeats": 1, "grid": 20},
}
TTA_THRESHOLDS = {"ME": 100.0}  # others (--tta_types): 95%
ORIGINAL_LINE = re.compile(r"\((\d+) \d+% finished\) TrainLoss: \S+, ValAccRetrieval: \S+, ValAccGeneralize: ([\d.]+)")
OUR_LINE = re.compile(r"episode (\d+) \|.*val generalization ([\d.]+)%")

# Run in the original's folder: its own episode samplers, timed directly. train.py sets these two globals
# in its __main__ block, which an import does not run.
ORIGINAL_GENERATION = """
import json, sys, time
import train as original
original.use_resconstruct_loss, original.max_try_novel = True, 100
generate_train, generate_val, _, _ = original.get_episode_generator(sys.argv[1])
tabu = set()
for _ in range(5):
    tabu = original.tabu_update(tabu, generate_val(tabu)["identifier"])
n, start = int(sys.argv[2]), time.perf_counter()
for _ in range(n):
    generate_train(tabu)
print(json.dumps({"episodes_per_s": n / (time.perf_counter() - start)}))
"""


class RunFailed(RuntimeError):
    pass


# ---- pure pieces (tests/test_compare.py) ---------------------------------------------------------------

def steady_rate(runs: list[tuple[int, float]]) -> float:
    """Episodes/s from runs of two lengths, [(episodes, seconds), ...]: (N2 - N1) / (T2 - T1) on the median
    time of each length, so whatever a run costs whatever its length (start-up, the end) cancels."""
    by_length: dict[int, list[float]] = {}
    for episodes, seconds in runs:
        by_length.setdefault(episodes, []).append(seconds)
    if len(by_length) != 2:
        raise ValueError(f"need runs of exactly two lengths, got {sorted(by_length)}")
    (n1, t1), (n2, t2) = sorted((n, statistics.median(ts)) for n, ts in by_length.items())
    if t2 <= t1:
        raise ValueError(f"the longer run ({n2} episodes, {t2:.1f} s) was not slower than the shorter "
                         f"({n1}, {t1:.1f} s): the machine's load changed; rerun")
    return (n2 - n1) / (t2 - t1)


def first_at_threshold(lines, pattern: re.Pattern, threshold: float):
    """The first (episode, generalization) line at or above threshold, or None; lines: an iterable of text."""
    for line in lines:
        match = pattern.search(line)
        if match and float(match.group(2)) >= threshold:
            return int(match.group(1)), float(match.group(2))
    return None


def rotated(items: list, k: int) -> list:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def ratio(numerator, denominator):
    return round(numerator / denominator, 2) if numerator and denominator else None


# ---- running the two sides -----------------------------------------------------------------------------

def child_env(threads_n: int, device: str = "cpu") -> dict[str, str]:
    """Both sides: the same thread settings, unbuffered output (for time-to-accuracy lines), and the same
    device: the original takes the GPU whenever CUDA is visible, so for the CPU it is hidden from both."""
    hide_gpu = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    return {**os.environ, **threads.thread_env(threads_n), **hide_gpu, "PYTHONUNBUFFERED": "1"}


def run_timed(argv: list[str], cwd: Path, env: dict, timeout: float) -> float:
    """Wall seconds of one command, start-up included; RunFailed with its last lines when it fails."""
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"timed out after {timeout:.0f} s: {' '.join(map(str, argv))}") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RunFailed(f"exit {done.returncode}: {' '.join(map(str, argv))}: {tail}")
    return time.perf_counter() - start


def original_train_argv(original: Path, episode_type: str, episodes: int, dir_model: Path) -> list[str]:
    return [sys.executable, str(original / "train.py"), "--episode_type", episode_type,
            "--num_episodes", str(episodes), "--dir_model", str(dir_model)]


def our_train_argv(episode_type: str, episodes: int, store: Path, dir_model: Path, threads_n: int,
                   extra: tuple[str, ...] = (), device: str = "cpu") -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "train", "--episode_type", episode_type, "--store", str(store),
            "--num_episodes", str(episodes), "--dir_model", str(dir_model), "--no_progress", "--device", device,
            "--threads", str(threads_n), *extra]


def make_store(root: Path, episode_type: str, episodes: int) -> Path:
    from pipeline import store as episode_store
    return episode_store.generate(episode_store.GenerateConfig(
        episode_type, num_episodes=episodes, out=str(root / "shards"), progress=False))


# ---- training ------------------------------------------------------------------------------------------

def our_variants(episode_type: str, args, cpu: dict) -> dict[str, tuple[str, ...] | str]:
    """Variant name -> extra `train` flags, or the reason it is skipped."""
    from trainer.config import default_batch_size
    default_b = default_batch_size(episode_type)
    variants: dict[str, tuple[str, ...] | str] = {f"ours default (B={default_b})": ()}
    if default_b != 1:
        variants["ours B=1"] = ("--batch_size", "1")
    if args.extras:
        variants["ours default, --amp bf16"] = (("--amp", "bf16") if cpu["native_bf16"] or args.device == "cuda"
                                                else "no native bf16 on this CPU (avx512_bf16 / amx_bf16)")
        variants["ours default, --compile"] = (("--compile",) if shutil.which("cc") or shutil.which("gcc")
                                               else "no C compiler for torch.compile's CPU backend")
    return variants


def warm_up(args, env: dict) -> None:
    """Load both sides' code once, untimed, so that no timed run pays for a cold file cache."""
    run_timed([sys.executable, str(args.original / "train.py"), "--help"], args.original, env, args.timeout)
    run_timed([sys.executable, "-c", "import trainer.train, evalsuite.evaluate"], ROOT, env, args.timeout)


def training(episode_type: str, lengths: tuple[int, int], args, cpu: dict, tmp: Path) -> dict:
    """Runs of both lengths for the original and each of our variants, alternating; steady rates, ratios."""
    store = make_store(tmp / "train", episode_type, max(lengths))
    env = child_env(args.threads, args.device)
    warm_up(args, env)
    variants = our_variants(episode_type, args, cpu)
    sides = {"original": None, **{name: extra for name, extra in variants.items() if not isinstance(extra, str)}}
    runs: dict[str, list] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for episodes in lengths:
            for name in rotated(list(sides), repeat):  # the sides alternate; their order turns each repeat
                workdir = Path(tempfile.mkdtemp(dir=tmp))
                argv = (original_train_argv(args.original, episode_type, episodes, workdir) if name == "original"
                        else our_train_argv(episode_type, episodes, store, workdir, args.threads, sides[name],
                                           args.device))
                cwd = args.original if name == "original" else ROOT
                runs[name].append((episodes, round(run_timed(argv, cwd, env, args.timeout), 2)))
                shutil.rmtree(workdir, ignore_errors=True)
    rates, notes = {}, {}
    for name, side_runs in runs.items():
        try:
            rates[name] = round(steady_rate(side_runs), 2)
        except ValueError as err:  # too noisy to tell (tiny --quick runs, a machine whose load changed)
            rates[name], notes[name] = None, str(err)
    return {"lengths": list(lengths), "episodes_per_s": rates, "runs_episodes_seconds": runs, "notes": notes,
            "ratio_to_original": {name: ratio(rate, rates["original"]) for name, rate in rates.items()
                                  if name != "original"},
            "skipped": {name: why for name, why in variants.items() if isinstance(why, str)}}


# ---- generation ----------------------------------------------------------------------------------------

def generation(episode_type: str, sizes: tuple[int, int], args, tmp: Path) -> dict:
    from generate import episodes_per_second  # benchmarks/generate.py: our generate(), to disk
    n_original, n_ours = sizes
    argv = [sys.executable, "-c", ORIGINAL_GENERATION, episode_type, str(n_original)]
    done = subprocess.run(argv, cwd=args.original, env=child_env(args.threads), capture_output=True, text=True,
                          timeout=args.timeout)
    if done.returncode != 0:
        raise RunFailed(f"the original's generation failed: {done.stderr.strip().splitlines()[-1:]}")
    original = json.loads(done.stdout.strip().splitlines()[-1])["episodes_per_s"]
    cores = threads.usable_cores()
    ours = {f"ours, {w} worker{'s' * (w > 1)}": episodes_per_second(episode_type, n_ours, w)
            for w in sorted({1, cores})}
    return {"episodes": {"original": n_original, "ours": n_ours}, "episodes_per_s":
            {"original": round(original, 1), **{k: round(v) for k, v in ours.items()}},
            "ratio_to_original": {k: ratio(v, original) for k, v in ours.items()}}


# ---- add-jump test -------------------------------------------------------------------------------------

def jump_checkpoints(args, tmp: Path) -> tuple[Path, Path, str]:
    if args.jump_checkpoints:
        ours, original = map(Path, args.jump_checkpoints)
        return ours.resolve(), original.resolve(), "given (--jump_checkpoints)"
    env = child_env(args.threads)
    store = make_store(tmp / "jump", JUMP_TYPE, 1)
    run_timed(original_train_argv(args.original, JUMP_TYPE, 1, tmp / "jump_original"), args.original, env,
              args.timeout)
    run_timed(our_train_argv(JUMP_TYPE, 1, store, tmp / "jump_ours", args.threads, ("--batch_size", "1")),
              ROOT, env, args.timeout)
    return (tmp / "jump_ours" / f"net_{JUMP_TYPE}.pt", tmp / "jump_original" / f"net_{JUMP_TYPE}.tar",
            "one training episode on each side (effectively untrained)")


def add_jump(args, repeats: int, tmp: Path) -> dict:
    ours_ckpt, original_ckpt, kind = jump_checkpoints(args, tmp)
    env, out = child_env(args.threads), tmp / "jump_eval"
    sides = {"original": ([sys.executable, str(args.original / "test.py"), "--episode_type", JUMP_TYPE,
                           "--dir_model", str(original_ckpt.parent), "--fn_in_model", original_ckpt.name],
                          args.original),
             "ours": ([sys.executable, str(ROOT / "cli.py"), "eval", "--checkpoint", str(ours_ckpt), "--split",
                       "addprim_jump", "--out", str(out), "--no_progress", "--device", "cpu",
                       "--threads", str(args.threads)], ROOT)}
    walls: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(repeats):
        for name in rotated(list(sides), repeat):
            walls[name].append(round(run_timed(*sides[name], env, args.timeout), 2))
    medians = {name: statistics.median(w) for name, w in walls.items()}
    lengths = [len(json.loads(line)["prediction"].split()) for line in open(out / "predictions_addprim_jump.jsonl")]
    return {"checkpoints": kind, "wall_seconds": walls, "wall_median": medians,
            "speedup": ratio(medians["original"], medians["ours"]),
            "ours_mean_output_length": round(statistics.mean(lengths), 2), "original_output_length": "always 50"}


# ---- FLOPs ---------------------------------------------------------------------------------------------

def valid_gflop_per_episode(episode_type: str, episodes: int, tmp: Path) -> dict:
    """Training GFLOP per episode on valid tokens, over the first episodes our loader streams from a store."""
    from flops import train_flops
    from pipeline import store as episode_store
    from trainer.data import StreamConfig, Tokenizer, make_loader
    from trainer.config import TrainConfig
    from trainer.state import model_config
    store = make_store(tmp / "flops", episode_type, episodes)
    manifest = episode_store.load_manifest(store)
    cfg = TrainConfig(episode_type=episode_type)
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    stream = StreamConfig(tuple(str(p) for p in episode_store.shard_paths(store, "train")), cfg.batch_size,
                          tokenizer)
    total, valid_targets, padded_targets = 0, 0, 0
    for _, batch in make_loader(stream):
        total += int(train_flops(batch, model_config(cfg, manifest)).sum())
        valid_targets += int(batch.query_out_len.sum())
        padded_targets += batch.query_out.numel()
    return {"valid_gflop_per_episode": round(total / episodes / 1e9, 3),
            "decoder_valid_token_fraction_at_default_batch": round(valid_targets / padded_targets, 3)}


def flops_report(training_rows: dict, episodes: int, tmp: Path) -> dict:
    import torch
    from flops import matmul_peak_flops
    peak = matmul_peak_flops()
    report = {"fp32_matmul_peak_gflop_s": round(peak / 1e9, 1), "torch_threads": torch.get_num_threads()}
    for episode_type, row in training_rows.items():
        per_episode = valid_gflop_per_episode(episode_type, episodes, tmp)
        achieved = {name: round(per_episode["valid_gflop_per_episode"] * rate, 2)
                    for name, rate in row["episodes_per_s"].items() if rate}
        report[episode_type] = {**per_episode, "valid_gflop_s": achieved,
                                "fraction_of_peak": {k: round(v / (peak / 1e9), 3) for k, v in achieved.items()}}
    return report


# ---- stacks of seeds ----------------------------------------------------------------------------------

def run_side_by_side(argvs: list[list[str]], cwd: Path, env: dict, timeout: float) -> float:
    """Wall seconds until every command, all started at once, has finished."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(argvs)) as pool:
        list(pool.map(lambda argv: run_timed(argv, cwd, env, timeout), argvs))
    return time.perf_counter() - start


def grid_rate(runs: list[tuple[int, float]], models: int) -> float | None:
    """Episodes/s summed over `models` trained side by side; None when too noisy to tell (tiny --quick runs)."""
    try:
        return round(models * steady_rate(runs), 2)
    except ValueError:
        return None


def separate_runs(side: str, episode_type: str, lengths, store: Path, args, cores: int, tmp: Path) -> dict:
    """Grid rate of separate runs: one process with all threads, and `cores` processes with one thread each."""
    rates = {}
    for procs, per_proc in ((1, cores), (cores, 1)):
        env = child_env(per_proc)
        runs = []
        for episodes in lengths:
            argvs = [original_train_argv(args.original, episode_type, episodes, Path(tempfile.mkdtemp(dir=tmp)))
                     if side == "original" else
                     our_train_argv(episode_type, episodes, store, Path(tempfile.mkdtemp(dir=tmp)), per_proc,
                                    ("--seed", str(k), "--val_every", "100")) for k in range(procs)]
            runs.append((episodes, run_side_by_side(argvs, args.original if side == "original" else ROOT, env,
                                                    args.timeout)))
        rates[f"{procs} process(es) x {per_proc} thread(s)"] = grid_rate(runs, procs)
    return {"episodes_per_s": rates, "best": max((r for r in rates.values() if r), default=None)}


def stacked_runs(episode_type: str, lengths, store: Path, args, cores: int, tmp: Path) -> dict:
    rates = {}
    for m in args.stack_sizes:
        seeds = ",".join(str(k) for k in range(m))
        runs = [(n, run_timed(our_train_argv(episode_type, n, store, Path(tempfile.mkdtemp(dir=tmp)), cores,
                                             ("--seeds", seeds, "--val_every", "100")), ROOT, child_env(cores),
                              args.timeout)) for n in lengths]
        rates[m] = grid_rate(runs, m)
    return rates


def stacks(episode_type: str, lengths, args, tmp: Path) -> dict:
    """Ours stacked for each M, ours and the original as separate runs; ratios; FLOPs against the peak."""
    import torch
    from flops import matmul_peak_flops
    from pipeline.threads import usable_cores
    cores = args.threads or usable_cores()
    torch.set_num_threads(cores)
    store = make_store(tmp / "stacks", episode_type, max(lengths))
    warm_up(args, child_env(cores))
    original = separate_runs("original", episode_type, lengths, store, args, cores, tmp)
    ours_separate = separate_runs("ours", episode_type, lengths, store, args, cores, tmp)
    stacked = stacked_runs(episode_type, lengths, store, args, cores, tmp)
    peak = matmul_peak_flops() / 1e9
    gflop = valid_gflop_per_episode(episode_type, 40 if args.quick else 200, tmp)["valid_gflop_per_episode"]
    fraction = lambda rate: round(gflop * rate / peak, 3) if rate else None  # noqa: E731
    return {"lengths_per_model": list(lengths), "threads": cores, "fp32_matmul_peak_gflop_s": round(peak, 1),
            "valid_gflop_per_episode": gflop, "original": original, "ours_separate": ours_separate,
            "ours_stacked": stacked,
            "fraction_of_peak": {"original": fraction(original["best"]), "ours_separate": fraction(ours_separate["best"]),
                                 **{f"stack M={m}": fraction(r) for m, r in stacked.items()}},
            "ratio_stack_to_original": {m: ratio(r, original["best"]) for m, r in stacked.items()},
            "ratio_stack_to_ours_separate": {m: ratio(r, ours_separate["best"]) for m, r in stacked.items()}}


# ---- a grid of seeds, end to end --------------------------------------------------------------------------

GRID_SEEDS = 4


def original_grid(episodes: int, args, cores: int, tmp: Path) -> float:
    """Wall seconds of the original's train.py for GRID_SEEDS seeds, `cores` at a time, one thread each."""
    argvs = [original_train_argv(args.original, "ME", episodes, Path(tempfile.mkdtemp(dir=tmp)))
             for _ in range(GRID_SEEDS)]
    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(lambda argv: run_timed(argv, args.original, child_env(1), args.timeout), argvs))
    return time.perf_counter() - start


def our_grid(episodes: int, args, tmp: Path, *flags: str) -> float:
    out = Path(tempfile.mkdtemp(dir=tmp)) / "runs"
    argv = [sys.executable, str(ROOT / "cli.py"), "reproduce", "--experiments", "ME", "--seeds",
            ",".join(map(str, range(GRID_SEEDS))), "--num_episodes", str(episodes), "--out", str(out), *flags]
    # reproduce gives each of its jobs its share of the cores (--threads) itself.
    return run_timed(argv, ROOT, {**os.environ, "CUDA_VISIBLE_DEVICES": ""}, args.timeout * GRID_SEEDS)


def grid(episodes: int, args, tmp: Path) -> dict:
    """The three arrangements, alternating over --repeats; the median wall time of each."""
    from pipeline.threads import usable_cores
    cores = args.threads or usable_cores()
    times = {"original, one process per core": [], "ours, reproduce's default": [], "ours, reproduce --stacked": []}
    for _ in range(args.repeats):
        times["original, one process per core"].append(original_grid(episodes, args, cores, tmp))
        times["ours, reproduce's default"].append(our_grid(episodes, args, tmp))
        times["ours, reproduce --stacked"].append(our_grid(episodes, args, tmp, "--stacked"))
    seconds = {name: round(statistics.median(t), 1) for name, t in times.items()}
    original = seconds["original, one process per core"]
    return {"seeds": GRID_SEEDS, "episodes_per_seed": episodes, "cores": cores, "seconds": seconds,
            "runs": {name: [round(x, 1) for x in t] for name, t in times.items()},
            "speedup_over_original": {name: ratio(original, s) for name, s in seconds.items() if s != original}}


# ---- time to accuracy (--full) -------------------------------------------------------------------------

def time_to_threshold(argv: list[str], cwd: Path, env: dict, pattern: re.Pattern, threshold: float,
                      timeout: float) -> dict:
    """Launch, read the validation lines as they come, stop at the first at the threshold."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        hit = first_at_threshold(proc.stdout, pattern, threshold)
        seconds = time.perf_counter() - start
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    if hit is None:
        return {"reached": False, "seconds": None, "note": f"not reached (ended or timed out at {timeout:.0f} s)"}
    return {"reached": True, "seconds": round(seconds, 1), "episode": hit[0], "generalization": hit[1]}


def time_to_accuracy(episode_type: str, args, tmp: Path) -> dict:
    """One launch of each side, to the first validation line at the threshold. --tta_side_by_side runs the two
    at the same time with half the threads each (the same conditions for both, in half the wall time)."""
    threshold = TTA_THRESHOLDS.get(episode_type, 95.0)
    threads_n = max(1, args.threads // 2) if args.tta_side_by_side else args.threads
    env = child_env(threads_n, args.device)
    ours_argv = our_train_argv(episode_type, 10000, tmp / "tta" / "shards" / episode_type, tmp / "tta" / "ours",
                               threads_n, extra=("--seed", str(args.tta_seed)),
                               device=args.device)  # a fresh store: its generation counts, as for a newcomer
    original_argv = original_train_argv(args.original, episode_type, 10000, tmp / "tta" / "original")
    launches = {"original": (original_argv, args.original, ORIGINAL_LINE),
                "ours (default recipe)": (ours_argv, ROOT, OUR_LINE)}
    with ThreadPoolExecutor(max_workers=2 if args.tta_side_by_side else 1) as pool:
        futures = {side: pool.submit(time_to_threshold, argv, cwd, env, line, threshold, args.tta_timeout)
                   for side, (argv, cwd, line) in launches.items()}
        results = {side: future.result() for side, future in futures.items()}
    return {"threshold_generalization": threshold, "threads_per_side": threads_n, "our_seed": args.tta_seed,
            "side_by_side": args.tta_side_by_side, **results,
            "speedup": ratio(results["original"]["seconds"], results["ours (default recipe)"]["seconds"])}


# ---- main ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    mode.add_argument("--full", action="store_true", help="also time to accuracy (about 15 minutes more for ME)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None,
                        help="what to run [default: all but tta; tta too with --full]")
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    parser.add_argument("--tta_types", nargs="+", default=["ME"], help="episode types for time to accuracy")
    parser.add_argument("--tta_side_by_side", action="store_true",
                        help="time to accuracy: both sides at once, half the threads each")
    parser.add_argument("--tta_seed", type=int, default=0, help="time to accuracy: our --seed (store and model)")
    parser.add_argument("--threads", type=int, default=None, help="both sides [default: pipeline.threads' policy]")
    parser.add_argument("--stack_sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="stacks part: the numbers of seeds trained as one stack")
    parser.add_argument("--repeats", type=int, default=1, help="training runs of each length per side")
    parser.add_argument("--extras", action="store_true", help="also ours with --amp bf16 and with --compile")
    parser.add_argument("--jump_checkpoints", nargs=2, metavar=("OURS_PT", "ORIGINAL_TAR"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides train (training and tta parts; the others stay on the CPU)")
    parser.add_argument("--original", type=Path, default=DEFAULT_ORIGINAL)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--tta_timeout", type=float, default=7200, help="seconds per time-to-accuracy run")
    args = parser.parse_args(argv)
    args.parts = args.parts or [p for p in PARTS if p not in ("tta", "stacks", "grid") or args.full]
    args.original = args.original.resolve()
    return args


def skip_reason(original: Path) -> str | None:
    if not (original / "train.py").is_file() or not (original / "test.py").is_file():
        return f"{original_missing(original)} (train.py and test.py); nothing to compare against"
    return None


def run_parts(args, report: dict, tmp: Path) -> None:
    sizes = SIZES["quick" if args.quick else "default"]
    if "generation" in args.parts:
        report["generation"] = {t: generation(t, sizes["generation"][t], args, tmp) for t in args.types}
    if "training" in args.parts or "flops" in args.parts:
        cpu = report["cpu"]
        report["training"] = {t: training(t, sizes["training"][t], args, cpu, tmp) for t in args.types}
    if "flops" in args.parts:
        report["flops"] = flops_report(report["training"], 40 if args.quick else 400, tmp)
    if "add_jump" in args.parts:
        report["add_jump"] = add_jump(args, sizes["jump_repeats"], tmp)
    if "stacks" in args.parts:
        report["stacks"] = {t: stacks(t, sizes["stacks"][t], args, tmp) for t in args.types}
    if "grid" in args.parts:
        report["grid"] = grid(sizes["grid"], args, tmp)
    if "tta" in args.parts:
        report["time_to_accuracy"] = {t: time_to_accuracy(t, args, tmp) for t in args.tta_types}


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = skip_reason(args.original)
    if reason:
        print(f"compare.py: skipped: {reason}", file=sys.stderr)
        print(json.dumps({"skipped": reason}))
        return 0
    applied = threads.apply(args.threads)  # this process too (the peak), before torch loads
    args.threads = applied["threads"]
    from pipeline.provenance import collect
    report = {"mode": "quick" if args.quick else "full" if args.full else "default", "cpu": read_cpu_info(),
              "threads": applied, "provenance": collect(), "original": str(args.original),
              "load_average_before": load_average(), "device": args.device}
    if args.device == "cuda":
        import torch
        report["gpu"] = torch.cuda.get_device_name(0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_parts(args, report, Path(tmp))
    except (RunFailed, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report["load_average_after"] = load_average()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
