"""Issue 15, the clip: does the gradient clip at 50 ever act in ME training?

    python docs/experiments/me_gradient_norms.py METRICS.jsonl ...   # e.g. runs/ME/full/seed*/net_ME.metrics.jsonl

Ours clips each model's whole gradient at norm 50; the original clips its encoder and its decoder at 50 each
(and its logs never print "Gradient clipped"). The two differ only for a step whose whole norm is over 50.
Every row of a run's metrics log holds the mean and the largest gradient norm before the clip over the steps
since the row before (`grad_norm`, `grad_norm_max`); this reads them back, per run: the largest norm, the
mean, and how many rows had a step over the clip.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CLIP = 50.0  # ours and the original's (train's clip)


def summary(metrics: Path, clip: float = CLIP) -> str:
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
    rows = [r for r in rows if "grad_norm" in r]
    if not rows:
        return f"{metrics}: no gradient norms logged"
    largest, mean = max(r["grad_norm_max"] for r in rows), sum(r["grad_norm"] for r in rows) / len(rows)
    over = sum(r["grad_norm_max"] > clip for r in rows)
    return (f"{metrics}: {len(rows)} rows to episode {rows[-1]['episodes']}: largest norm {largest:.2f}, mean "
            f"{mean:.2f}, rows with a step over {clip:g}: {over}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.split("\n\n")[1].strip())
    for name in sys.argv[1:]:
        print(summary(Path(name)))
