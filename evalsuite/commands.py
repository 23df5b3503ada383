"""The command lines of a grid's steps: a job's `cli.py train` (one run, or a stack of seeds) written from the
run's one TrainConfig (grid.expected_config), and a run's `cli.py eval`."""
from __future__ import annotations

import os
import sys
from dataclasses import fields, replace
from pathlib import Path

from evalsuite.aggregate import Run
from evalsuite.grid import ReproduceConfig, expected_config, store_path
from trainer.config import SEED_FIELD, SETTINGS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent  # where `python -m cli` imports from (a checkout, or site-packages)


def train_flags(config: TrainConfig) -> list[str]:
    """`config` as `cli.py train` words: every command-line setting that differs from its default."""
    words = []
    for spec in fields(TrainConfig):
        value, flag = getattr(config, spec.name), spec.metadata["flag"]
        if flag == "" or value == spec.default:
            continue
        if isinstance(value, bool):  # a bare flag, or one side of a --on/--off pair
            words.append(flag.split("/")[0 if value else 1] if flag else f"--{spec.name}")
        else:
            words += [flag or f"--{spec.name}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return words


def train_config(cfg: ReproduceConfig, runs: tuple[Run, ...], resume: bool) -> TrainConfig:
    """What one train process does: one run, or the seeds of one experiment and variant as a stack (each
    model's store and folder by its seed)."""
    config = replace(expected_config(cfg, runs[0]), generate_missing_store=False, progress=False, resume=resume)
    if len(runs) == 1:
        return config
    return replace(config, seed=SETTINGS["seed"].default, seeds=tuple(r.seed for r in runs),
                   store=str(store_path(cfg, runs[0].experiment, SEED_FIELD)),
                   dir_model=str(Path(config.dir_model).parent))


def threads_flag(cfg: ReproduceConfig) -> list[str]:
    """Each job's share of the cores; none (the job's own adaptive policy) when the grid leaves it open."""
    return [] if cfg.threads_per_job is None else ["--threads", str(cfg.threads_per_job)]


def train_command(cfg: ReproduceConfig, runs: tuple[Run, ...], resume: bool) -> list[str]:
    return [sys.executable, "-m", "cli", "train", *train_flags(train_config(cfg, runs, resume)), *threads_flag(cfg)]


def eval_command(cfg: ReproduceConfig, run: Run) -> list[str]:
    words = ["--checkpoint", str(run.checkpoint(cfg.out)), "--out", str(run.eval_dir(cfg.out)), "--no_progress"]
    if "device" in cfg.train:
        words += ["--device", cfg.train["device"]]
    return [sys.executable, "-m", "cli", "eval", *words, *threads_flag(cfg)]


def importable_path() -> str:
    """PYTHONPATH with this project's root first, so that `python -m cli` runs this copy from any directory."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

