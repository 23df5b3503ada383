"""What a run reports as it goes: a line per validation point on the terminal, the same as JSONL on disk,
the same as TensorBoard scalars, and the learning curve."""
from __future__ import annotations

import json
import shutil
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


def tensorboard_writer_class():
    """torch's SummaryWriter, or None where the tensorboard package is not installed (training goes on)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def tensorboard_tag(key: str) -> str:
    """A row's key as a TensorBoard tag: "val_generalization" is "val/generalization", "loss" "train/loss"."""
    return f"val/{key[len('val_'):]}" if key.startswith("val_") else f"train/{key}"


class RunLog:
    """One line per validation point on the terminal, the same as JSONL on disk (appended and closed at each
    point, so it is on disk as it happens), the same as TensorBoard scalars (x axis: episodes) in
    `<dir_model>/tb/<checkpoint stem>/`, flushed at each point, and the curve PNG, redrawn at every checkpoint.

    On --resume, the rows logged after the checkpoint are trained again: they are dropped from the JSONL, and
    the TensorBoard writer reopens with purge_step just after the checkpoint's episode, so that TensorBoard
    discards the old events from there on and the curves do not double."""

    def __init__(self, cfg: TrainConfig, is_main: bool, episodes_done: int):
        self.is_main = is_main
        self.metrics_path, self.plot_path = self.paths(cfg)
        self.tb_dir = self.tensorboard_dir(cfg)
        self.purge_step = episodes_done + 1 if cfg.resume else None  # the checkpoint's own row is kept
        self.writer = None
        if not is_main:
            return
        if cfg.resume:
            self._drop_rows_after(episodes_done)
        else:  # a new run (--overwrite included): nothing of an older one stays beside it
            for path in (self.metrics_path, self.plot_path, cfg.checkpoint_path):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.tb_dir, ignore_errors=True)

    @staticmethod
    def tensorboard_dir(cfg: TrainConfig) -> Path:
        """Beside the checkpoint, one folder per run: `tensorboard --logdir <dir_model>` shows every run."""
        return cfg.checkpoint_path.parent / "tb" / cfg.checkpoint_path.stem

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

    def record_row(self, state: TrainState, rate: float, loss: float, lr: float, stack_models: int = 1,
                   grad_norms=()) -> None:
        """A stack's rows give its rate summed over its models, and how many (stack_models). `grad_norms`: the
        model's gradient norm before the clip at each step since the last row (their mean and largest)."""
        norms = [float(n) for n in grad_norms]
        row = {"episodes": state.episodes_done, "episodes_per_s": round(rate, 2), "loss": loss, "lr": lr,
               **({"grad_norm": sum(norms) / len(norms), "grad_norm_max": max(norms)} if norms else {}),
               "threads": torch.get_num_threads(), **({"stack_models": stack_models} if stack_models > 1 else {}),
               **{f"val_{k}": v for k, v in state.last_val.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_scalars(row)

    def _write_scalars(self, row: dict) -> None:
        if self.writer is None:  # opened at the first row: a run with nothing to log leaves no events file
            writer_class = tensorboard_writer_class()
            if writer_class is None:
                return
            self.writer = writer_class(log_dir=str(self.tb_dir), purge_step=self.purge_step)
        for key, value in row.items():
            if key != "episodes" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tensorboard_tag(key), value, global_step=row["episodes"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def draw(self) -> None:
        from trainer.report import plot_curves  # matplotlib is slow to import: at the first checkpoint only
        rows = self.rows()
        if rows:
            plot_curves(rows, self.plot_path)
