"""Attention heatmaps of single queries: what the model looked up in memory, and where its decoder looked.

Left panel: memory attention, rows = the query's input tokens (and EOS), columns = the support items (by
their input). Right panel: decoder attention, rows = the output tokens it wrote, columns = the query's
input tokens. A panel whose mechanism the model lacks (disable_memory / disable_attention) is left out.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402

from evalsuite.decode import query_attention as decode_attention  # noqa: E402
from pipeline.vocab import EOS  # noqa: E402
from trainer.report import save_png  # noqa: E402


def plot_split(loaded, task, n: int, out_dir: Path) -> list[Path]:
    """Heatmaps of the first `n` queries of the split, as DIR/attention_<split>_<i>.png."""
    paths = []
    for i, (episode, query) in enumerate(first_queries(task, n)):
        attention = query_attention(loaded, episode, query)
        if attention is None:  # neither memory nor decoder attention: nothing to draw
            break
        path = Path(out_dir) / f"attention_{task.name}_{i}.png"
        draw(path, episode, query, *attention)
        paths.append(path)
    return paths


def first_queries(task, n: int):
    """(episode, query input) of the first n queries, episode by episode."""
    taken = 0
    for episode in task.episodes:
        for query, _ in episode.queries:
            if taken == n:
                return
            yield episode, query
            taken += 1


def query_attention(loaded, episode, query: str):
    """(output tokens, memory attention (Tqi, ns) or None, decoder attention (L, Tqi) or None); None when
    the model has neither."""
    found = decode_attention(loaded.model, loaded.tokenizer, episode.support, query, loaded.max_length,
                             loaded.device, [q for q, _ in episode.queries])
    if found.memory is None and found.decoder is None:
        return None
    return found.outputs, found.memory, found.decoder


CELL = 0.3  # inches per heatmap cell: room for one tick label


def draw(path: Path, episode, query: str, outputs: list[str], memory, decoder) -> None:
    query_tokens = query.split() + [EOS]
    panels = []
    if memory is not None:
        panels.append((memory, query_tokens, [i for i, _ in episode.support], "memory attention",
                       "support item (its input)", "query input token"))
    if decoder is not None:
        panels.append((decoder, outputs, query_tokens, "decoder attention", "query input token", "output token"))
    # Long support inputs (scan_length) stand as rotated tick labels under the memory panel: leave room.
    label_room = 0.08 * max((len(i) for i, _ in episode.support), default=0) if memory is not None else 0.0
    width = sum(2.5 + CELL * len(p[2]) for p in panels)
    height = 2.2 + label_room + CELL * max(len(p[1]) for p in panels)
    width = max(6.0, width)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False,
                             width_ratios=[max(3, len(p[2])) for p in panels], layout="constrained")
    for ax, panel in zip(axes[0], panels):
        _heatmap(ax, *panel)
    fits = int(width * 11)  # characters of a 9-pt title line that fit across the figure
    fig.suptitle(f"query: {textwrap.shorten(query, fits)}\n"
                 f"output: {textwrap.shorten(' '.join(outputs), fits - 8, placeholder=' ...')}", fontsize=9)
    save_png(fig, path)


def _heatmap(ax, weights, rows: list[str], cols: list[str], title: str, xlabel: str, ylabel: str) -> None:
    # Scaled to the panel's largest weight: over 100 support items (scan_length) every weight is small.
    image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=max(float(weights.max()), 1e-6),
                      aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
