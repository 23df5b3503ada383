"""Issue 23: the new default's table against the earlier default's, row by row.

    python docs/experiments/compare_tables.py docs/results_earlier_default.json docs/results.json

Each argument is an aggregate that `cli.py reproduce` or `cli.py aggregate` wrote (results.json). For every
(experiment, variant) in both and every metric of that row, it prints both rows' mean ± sd over seeds and the
seeds behind them; whether the new mean is within one sd of the earlier one, or better; and two-sided
p-values of Welch's t-test and of the Mann-Whitney U test (scipy), which need two seeds or more on each side.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evalsuite.aggregate import format_stat, summarize  # noqa: E402


def seed_values(group: dict, metric: str) -> list[float]:
    return [v for v in group["metrics"][metric]["values"].values() if v is not None]


def p_values(before: list[float], after: list[float]) -> str:
    if min(len(before), len(after)) < 2:
        return "-"
    with warnings.catch_warnings():  # identical seeds on both sides have no spread: Welch's p is nan
        warnings.simplefilter("ignore", RuntimeWarning)
        welch = stats.ttest_ind(before, after, equal_var=False).pvalue
    mann_whitney = stats.mannwhitneyu(before, after, alternative="two-sided").pvalue
    welch_text = "-" if math.isnan(welch) else f"{welch:.2f}"
    return f"Welch p = {welch_text}, Mann-Whitney p = {mann_whitney:.2f}"


def within_one_sd(before: list[float], after: list[float]) -> str:
    mean, new = statistics.fmean(before), statistics.fmean(after)
    sd = statistics.stdev(before) if len(before) > 1 else 0.0
    if new >= mean - sd:
        return "yes" if new <= mean + sd else "yes (better)"
    return f"no ({mean - sd - new:.2f} points under)"


def compare(earlier: dict, new: dict) -> list[str]:
    lines = []
    earlier_groups = {(g["experiment"], g["variant"]): g for g in earlier["groups"]}
    for group in new["groups"]:
        before_group = earlier_groups.get((group["experiment"], group["variant"]))
        if before_group is None:
            continue
        for metric in group["metrics"]:
            before, after = seed_values(before_group, metric), seed_values(group, metric)
            if before and after:
                seeds = [round(v, 2) for v in after]
                lines.append(f"{group['experiment']} {group['variant']} {metric}: "
                             f"earlier {format_stat(summarize(before))}, new {format_stat(summarize(after))} {seeds}; "
                             f"within one sd: {within_one_sd(before, after)}; {p_values(before, after)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("earlier", help="the earlier table's results.json")
    parser.add_argument("new", help="the new table's results.json")
    args = parser.parse_args()
    with open(args.earlier) as f_earlier, open(args.new) as f_new:
        print("\n".join(compare(json.load(f_earlier), json.load(f_new))))


if __name__ == "__main__":
    main()
