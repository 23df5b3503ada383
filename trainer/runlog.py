"""What a run reports as it goes: a line per validation point on the terminal, the same as JSONL on disk,
and the learning curve."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.shardio import write_bytes_atomically
from trainer.config import TrainConfig

if TYPE_CHECKING:
    from trainer.state import TrainState


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def log_line(state: TrainState, rate: float, loss: float) -> str:
    val = state.last_val or {}
    return (f"episode {state.episodes_done} | {rate:.1f} episodes/s | loss {loss:.4f} | "
            f"val retrieval {_fmt(val.get('retrieval'))} | val generalization {_fmt(val.get('generalization'))}")


def crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


class RunLog:
    """One line per validation point on the terminal, the same as JSONL on disk (appended and closed at each
    point, so it is on disk as it happens), and the curve PNG, redrawn at every checkpoint."""

    def __init__(self, cfg: TrainConfig, is_main: bool, episodes_done: int):
        self.is_main = is_main
        self.metrics_path, self.plot_path = self.paths(cfg)
        if not is_main:
            return
        if cfg.resume:
            self._drop_rows_after(episodes_done)
        else:  # a new run (--overwrite included): nothing of an older one stays beside it
            for path in (self.metrics_path, self.plot_path, cfg.checkpoint_path):
                path.unlink(missing_ok=True)

    @staticmethod
    def paths(cfg: TrainConfig) -> tuple[Path, Path]:
        stem = cfg.checkpoint_path.with_suffix("")
        return stem.with_name(stem.name + ".metrics.jsonl"), stem.with_name(stem.name + ".curve.png")

    def rows(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def _drop_rows_after(self, episodes_done: int) -> None:
        """Rows logged after the checkpoint (a run killed between checkpoints) are trained again: drop them."""
        rows = self.rows()
        kept = [r for r in rows if r["episodes"] <= episodes_done]
        if len(kept) < len(rows):
            write_bytes_atomically(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def record(self, state: TrainState, rate: float, loss: float, bar) -> None:
        self.record_row(state, rate, loss, state.optimizer.param_groups[0]["lr"])
        message = log_line(state, rate, loss)
        if bar.disable:
            print(message, flush=True)
        else:
            bar.write(message)  # above the progress bar, which stays at the bottom

    def record_row(self, state: TrainState, rate: float, loss: float, lr: float) -> None:
        row = {"episodes": state.episodes_done, "episodes_per_s": round(rate, 2), "loss": loss, "lr": lr,
               "threads": torch.get_num_threads(), **{f"val_{k}": v for k, v in state.last_val.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def draw(self) -> None:
        from trainer.report import plot_curves  # matplotlib is slow to import: at the first checkpoint only
        rows = self.rows()
        if rows:
            plot_curves(rows, self.plot_path)
