"""The figures a user looks at: the training curve's loss axis and the legend of reproduce's results.png."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from evalsuite.aggregate import grid_figure
from trainer.report import curve_figure, plain_number

ROOT = Path(__file__).resolve().parents[1]


def visible_tick_labels(ax) -> list[tuple[float, str]]:
    low, high = ax.get_ylim()
    ticks = ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
    return [(t.get_loc(), t.label1.get_text()) for t in ticks
            if t.label1.get_visible() and t.label1.get_text() and low <= t.get_loc() <= high]


@pytest.mark.parametrize("losses", [
    [1.3 - 0.05 * i / 20 for i in range(21)],   # the narrow range: 1.3 down to 1.25
    [2.5 * 0.9 ** i for i in range(21)],         # within two decades
    [3 * math.exp(-i / 2) for i in range(21)],  # four decades
])
def test_loss_axis_labels_are_plain_decimals(losses):
    rows = [{"episodes": 100 * i, "loss": loss, "val_retrieval": 50.0, "val_generalization": 10.0}
            for i, loss in enumerate(losses)]
    fig = curve_figure(rows)
    try:
        fig.canvas.draw()
        labels = visible_tick_labels(fig.axes[0])
    finally:
        plt.close(fig)
    assert len(labels) >= 2, labels
    for value, text in labels:
        assert all(c in "0123456789." for c in text), labels  # no ×10^k, no mathtext, no e-notation
        assert float(text) == pytest.approx(value, rel=0.005), labels


def test_plain_number():
    assert [plain_number(x) for x in (1.25, 1.3, 0.001, 20.0, 1000.0, 0.04)] == [
        "1.25", "1.3", "0.001", "20", "1000", "0.04"]


def test_results_legend_is_outside_the_panels():
    groups = json.loads((ROOT / "docs" / "results.json").read_text())["groups"]
    fig = grid_figure(groups)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend = fig.legends[0].get_window_extent(renderer)
        panels = [ax.get_tightbbox(renderer) for ax in fig.axes]  # with their tick labels and titles
    finally:
        plt.close(fig)
    assert len(panels) == 5
    for panel in panels:
        assert not legend.overlaps(panel)
    assert legend.y1 <= min(panel.y0 for panel in panels) + 1  # below all of them
    assert legend.x0 >= 0 and legend.x1 <= fig.bbox.x1  # and inside the figure
