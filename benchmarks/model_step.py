"""A training step of trainer/model.py against the same step of an earlier commit, in one run.

    python benchmarks/model_step.py [--baseline REV] [--cases ME:8 scan_prim_augmentation:1 ...]
                                    [--rounds 5] [--steps 6] [--min_seconds 3] [--threads 1] [--amp none|bf16]

For each case (episode type : batch size) it generates a small store, collates the same batches (support
items as queries, as the trainer does), builds both models with the same weights, and times training steps
(loss, backward, clip, Adam; dropout on) alternating between the two implementations, `--rounds` times,
each timing at least `--min_seconds`, so that a busy machine slows both alike. It prints JSON: per case
the median episodes/s of each side, the median of the per-round ratios, and the first batch's loss on
both sides in eval mode (they must agree).
The baseline's trainer/model.py is read with `git show REV:trainer/model.py` and loaded beside ours.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import store as episode_store  # noqa: E402
from pipeline.provenance import collect  # noqa: E402
from trainer.data import Tokenizer, collate_episodes, read_records  # noqa: E402
from trainer.model import MetaSeq2Seq, ModelConfig  # noqa: E402


def load_baseline(rev: str, tmp: Path):
    source = subprocess.run(["git", "show", f"{rev}:trainer/model.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = tmp / "baseline_model.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_batches(episode_type: str, batch_size: int, n_batches: int, tmp: Path):
    n = batch_size * n_batches
    store = episode_store.generate(episode_store.GenerateConfig(
        episode_type=episode_type, num_episodes=n, shard_size=n, workers=1, out=str(tmp / f"b{batch_size}"),
        progress=False))
    manifest = episode_store.load_manifest(store)
    tokenizer = Tokenizer(tuple(manifest["input_vocab"]), tuple(manifest["output_vocab"]))
    records = read_records(episode_store.shard_paths(store, "train"))
    batches = [collate_episodes(records[i:i + batch_size], tokenizer, support_as_queries=True)
               for i in range(0, n, batch_size)]
    return batches, ModelConfig(len(tokenizer.input_vocab), len(tokenizer.output_vocab))


def train_steps(model, optimizer, batches, amp: str = "none") -> float:
    """Seconds for one optimizer step on each batch (loss, backward, clip, Adam)."""
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        optimizer.step()
    return time.perf_counter() - start


def episodes_per_s(model, optimizer, batches, args) -> float:
    """Passes over `batches` until --min_seconds have gone by: short timings are mostly noise here."""
    episodes, seconds = 0, 0.0
    while seconds < args.min_seconds or episodes == 0:
        seconds += train_steps(model, optimizer, batches, args.amp)
        episodes += sum(b.num_episodes for b in batches)
    return episodes / seconds


def bench_case(episode_type: str, batch_size: int, baseline, args, tmp: Path) -> dict:
    batches, cfg = make_batches(episode_type, batch_size, args.steps + 1, tmp)
    torch.manual_seed(0)
    new = MetaSeq2Seq(cfg)
    old = baseline.MetaSeq2Seq(baseline.ModelConfig(**cfg.to_dict()))
    old.load_state_dict(new.state_dict())
    with torch.no_grad():
        losses = {"new": new.eval().loss(batches[0]).item(), "baseline": old.eval().loss(batches[0]).item()}
    sides = {"new": (new.train(), torch.optim.Adam(new.parameters(), 1e-3)),
             "baseline": (old.train(), torch.optim.Adam(old.parameters(), 1e-3))}
    for model, opt in sides.values():  # warm-up
        train_steps(model, opt, batches[:1], args.amp)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (model, opt) in sides.items():
            rates[name].append(episodes_per_s(model, opt, batches[1:], args))
    ratios = [n / b for n, b in zip(rates["new"], rates["baseline"])]
    return {"episode_type": episode_type, "batch_size": batch_size, "amp": args.amp,
            "valid_target_tokens": int(batches[0].query_out_len.sum()),
            "padded_target_tokens": int(batches[0].query_out.numel()),
            "episodes_per_s": {name: round(statistics.median(r), 2) for name, r in rates.items()},
            "ratio_median": round(statistics.median(ratios), 2), "ratios": [round(r, 2) for r in ratios],
            "eval_loss_first_batch": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision whose trainer/model.py is the baseline")
    parser.add_argument("--cases", nargs="+", default=["ME:8", "scan_prim_augmentation:1", "scan_prim_augmentation:8"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="distinct batches (optimizer steps) per pass")
    parser.add_argument("--min_seconds", type=float, default=3.0, help="least time per timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="CPU autocast for both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = load_baseline(args.baseline, Path(tmp))
        cases = [bench_case(t, int(b), baseline, args, Path(tmp)) for t, b in (c.split(":") for c in args.cases)]
    print(json.dumps({"baseline": args.baseline, "threads": args.threads, "rounds": args.rounds,
                      "steps": args.steps, "min_seconds": args.min_seconds, "provenance": collect(), "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
