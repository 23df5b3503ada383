"""Issue 15: compare ME arms on where each run first reaches 100% validation generalization (or --target).

    python docs/experiments/me_arms.py \\
        A='docs/experiments/logs/original_ME_run*.log' B='runs/cross/B/seed*.log' \\
        C='runs/cross/C/seed*/net_ME.metrics.jsonl' D='runs/ME/full/seed*/net_ME.metrics.jsonl' \\
        [--earlier A=3600,4400,never] [--decay 5000] [--horizon 10000] [--pairs A:D,B:D,C:D]
        [--at 2000,5000,10000 [--table]] [--target 90]

Each arm is a glob of run logs (or several, separated by commas), in either form:
  the original's log lines, "... (EPISODE NN% finished) ... ValAccGeneralize: X" (arm A, and arm B's adapter);
  our metrics log, one JSON object a line with "episodes" and "val_generalization" (arms C and D).
--earlier adds runs whose logs were not kept, as their first-100% episodes ("never" for none).

Per run it reports the episode of first 100% validation generalization, whether that is at or before the decay,
and validation generalization at the decay. Per pair of arms: a two-sided Mann-Whitney U test on the episode of
first 100%, counting only episodes up to --horizon and "never" as later than any of them; and Fisher's exact
test on the count at or before the decay. Arms of 5,000-episode runs (B and C) are compared with --horizon 5000,
which cuts every arm at the decay. --target sets the accuracy that counts as reached (100 for ME; 90 for a SCAN
run leaving its loss plateau); "first 100%" then reads "first 90%".
"""
from __future__ import annotations

import argparse
import glob
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ORIGINAL_LINE = re.compile(r"\((\d+) \d+% finished\).*ValAccGeneralize: ([\d.]+)")


@dataclass
class Run:
    name: str
    curve: dict[int, float]  # episode -> validation generalization (%)
    first_full: int | None = None  # set for --earlier runs without a curve

    def first_reaching(self, target: float) -> int | None:
        if not self.curve:
            return self.first_full
        return next((ep for ep in sorted(self.curve) if ep > 1 and self.curve[ep] >= target), None)

    def at(self, episode: int) -> float | None:
        return self.curve.get(episode)


def read_curve(path: Path) -> dict[int, float]:
    curve = {}
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if "val_generalization" in row:
                curve[int(row["episodes"])] = float(row["val_generalization"])
        elif m := ORIGINAL_LINE.search(line):
            curve[int(m.group(1))] = float(m.group(2))
    return curve


def load_arm(patterns: str) -> list[Run]:
    """The runs of one or more comma-separated globs, each glob's files in numeric order."""
    paths = [p for pattern in patterns.split(",")
             for p in sorted(glob.glob(pattern), key=lambda p: [int(n) for n in re.findall(r"\d+", p)] or [0])]
    return [Run(p, read_curve(Path(p))) for p in paths]


def earlier_runs(values: str) -> list[Run]:
    return [Run(f"earlier run {i}", {}, None if v == "never" else int(v))
            for i, v in enumerate(values.split(","), 1)]


def first_or_never(run: Run, never: int, target: float) -> int:
    first = run.first_reaching(target)
    return never if first is None or first >= never else first


def compare(a: list[Run], b: list[Run], decay: int, horizon: int, target: float = 100.0) -> dict:
    from scipy.stats import fisher_exact, mannwhitneyu
    never = horizon + 1
    first_a = [first_or_never(r, never, target) for r in a]
    first_b = [first_or_never(r, never, target) for r in b]
    pre_a = sum(f <= decay for f in first_a)
    pre_b = sum(f <= decay for f in first_b)
    mw = mannwhitneyu(first_a, first_b, alternative="two-sided")
    fisher = fisher_exact([[pre_a, len(a) - pre_a], [pre_b, len(b) - pre_b]])
    return {"pre_decay": (pre_a, len(a), pre_b, len(b)), "mann_whitney_p": float(mw.pvalue),
            "fisher_p": float(fisher.pvalue)}


def describe(arm: str, runs: list[Run], decay: int, horizon: int, target: float = 100.0) -> list[str]:
    lines = [f"## arm {arm}: {len(runs)} runs"]
    for run in runs:
        first, last = run.first_reaching(target), max(run.curve, default=None)
        at_decay = run.at(decay)
        lines.append(f"  {run.name}: first {target:g}% at {first if first is not None else 'never'}"
                     f"{' (before the decay)' if first is not None and first <= decay else ''}"
                     f"; at {decay}: {'-' if at_decay is None else f'{at_decay:.0f}'}"
                     f"{f'; logged to {last}' if last is not None and last < horizon else ''}")
    firsts = sorted(f for f in (r.first_reaching(target) for r in runs) if f is not None)
    pre = sum(f <= decay for f in firsts)
    lines.append(f"  reach {target:g}%: {len(firsts)} of {len(runs)}; at or before {decay}: {pre} of {len(runs)}; "
                 f"episodes {firsts}")
    return lines


def seed_table(runs: list[Run], episodes: list[int], target: float = 100.0) -> list[str]:
    """A markdown table: a column per run (its seed, from the path), a row per episode of --at, then the first
    episode at --target."""
    seeds = [(re.findall(r"seed(\d+)", r.name) or [str(i)])[-1] for i, r in enumerate(runs)]
    cell = lambda v: "-" if v is None else (f"**{v:.0f}**" if v >= target else f"{v:.0f}")  # noqa: E731
    lines = ["| seed | " + " | ".join(seeds) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {ep:,} | " + " | ".join(cell(r.at(ep)) for r in runs) + " |" for ep in episodes]
    firsts = [r.first_reaching(target) for r in runs]
    lines.append(f"| first {target:g}% | " + " | ".join("never" if f is None else f"{f:,}" for f in firsts) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arms", nargs="+", help="NAME=GLOB of run logs")
    parser.add_argument("--earlier", action="append", default=[], help="NAME=EP,EP,never for runs without logs")
    parser.add_argument("--decay", type=int, default=5000)
    parser.add_argument("--horizon", type=int, default=10000, help="the episode 'never' counts as after")
    parser.add_argument("--at", default="", help="EP,EP,...: also each arm's median validation generalization there")
    parser.add_argument("--pairs", default=None, help="NAME:NAME,... to test (default: every pair)")
    parser.add_argument("--table", action="store_true", help="also each arm's runs as a markdown table at --at")
    parser.add_argument("--target", type=float, default=100.0, help="the validation generalization that counts")
    args = parser.parse_intermixed_args(argv)
    arms = {}
    for spec in args.arms:
        name, _, pattern = spec.partition("=")
        arms[name] = load_arm(pattern)
        if not arms[name]:
            sys.exit(f"arm {name}: no run log matches {pattern}")
    for spec in args.earlier:
        name, _, values = spec.partition("=")
        arms.setdefault(name, []).extend(earlier_runs(values))
    for runs in arms.values():  # nothing after the horizon counts
        for run in runs:
            run.curve = {ep: acc for ep, acc in run.curve.items() if ep <= args.horizon}
            run.first_full = run.first_full if run.first_full and run.first_full <= args.horizon else None
    for name, runs in arms.items():
        print("\n".join(describe(name, runs, args.decay, args.horizon, args.target)))
        for episode in [int(e) for e in args.at.split(",") if e]:
            values = [r.at(episode) for r in runs if r.at(episode) is not None]
            if values:
                print(f"  at {episode}: median {statistics.median(values):.1f} over {len(values)} runs")
        if args.table:
            print("\n".join(seed_table(runs, [int(e) for e in args.at.split(",") if e], args.target)))
    names = list(arms)
    pairs = ([tuple(p.split(":")) for p in args.pairs.split(",")] if args.pairs else
             [(a, b) for i, a in enumerate(names) for b in names[i + 1:]])
    for a, b in pairs:
        result = compare(arms[a], arms[b], args.decay, args.horizon, args.target)
        pa, na, pb, nb = result["pre_decay"]
        print(f"{a} vs {b}: first {args.target:g}% by {args.decay}: {pa}/{na} vs {pb}/{nb}, "
              f"Fisher p = {result['fisher_p']:.3g}; "
              f"Mann-Whitney on the first-{args.target:g}% episode p = {result['mann_whitney_p']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
