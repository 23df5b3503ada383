"""The loss / accuracy curve of a run, from its metrics log."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from pipeline.shardio import write_atomically  # noqa: E402


def plain_number(value: float) -> str:
    """A tick label in plain decimals (1.25, 0.03, 20), never 1.25×10^0: three significant digits at most."""
    return np.format_float_positional(value, precision=3, unique=False, fractional=False, trim="-")


class PlainLogFormatter(ticker.LogFormatter):
    """Labels the ticks that matplotlib's log formatter would label (it thins the minor ticks of a wide
    range), in plain decimals."""

    def __call__(self, x, pos=None):
        return plain_number(x) if super().__call__(x, pos) else ""


def curve_figure(rows: list[dict]):
    episodes = [r["episodes"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(episodes, [r["loss"] for r in rows])
    ax_loss.set(xlabel="episodes", ylabel="train loss", yscale="log", title="training loss")
    ax_loss.yaxis.set_major_formatter(PlainLogFormatter())
    ax_loss.yaxis.set_minor_formatter(PlainLogFormatter(minor_thresholds=(2, 0.5)))
    for key, label in (("val_retrieval", "retrieval"), ("val_generalization", "generalization")):
        ax_acc.plot(episodes, [r.get(key) if r.get(key) is not None else float("nan") for r in rows], label=label)
    ax_acc.set(xlabel="episodes", ylabel="validation accuracy (%)", ylim=(-2, 102), title="validation")
    ax_acc.legend()
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict], path: Path) -> None:
    save_png(curve_figure(rows), path)  # atomically: redrawn at every checkpoint while someone may be looking


def save_png(fig, path: Path) -> None:
    """Write `fig` as a PNG that appears complete or not at all (shardio's temp file and rename), and close it."""
    try:
        write_atomically(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
