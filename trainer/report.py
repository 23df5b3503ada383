"""The loss / accuracy curve of a run, from its metrics log."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.shardio import write_atomically  # noqa: E402


def plot_curves(rows: list[dict], path: Path) -> None:
    episodes = [r["episodes"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(episodes, [r["loss"] for r in rows])
    ax_loss.set(xlabel="episodes", ylabel="train loss", yscale="log", title="training loss")
    for key, label in (("val_retrieval", "retrieval"), ("val_generalization", "generalization")):
        ax_acc.plot(episodes, [r.get(key) if r.get(key) is not None else float("nan") for r in rows], label=label)
    ax_acc.set(xlabel="episodes", ylabel="validation accuracy (%)", ylim=(-2, 102), title="validation")
    ax_acc.legend()
    fig.tight_layout()
    save_png(fig, path)  # atomically: the curve is redrawn at every checkpoint while someone may be looking at it


def save_png(fig, path: Path) -> None:
    """Write `fig` as a PNG that appears complete or not at all (shardio's temp file and rename), and close it."""
    try:
        write_atomically(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
