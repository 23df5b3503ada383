"""Checkpoints are plain data (tensors, numbers, strings, lists, dicts), loaded with weights_only=True.

Layout: format, version, episode_type, model_config, train_config, model, optimizer, scheduler,
input_vocab, output_vocab, episodes_done, data_position, store, manifest_sha256, rng, val.
"""
from __future__ import annotations

import contextlib
from dataclasses import fields
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.shardio import check_writable_dir, exclusive, write_atomically
from trainer.config import SETTINGS, upgrade_settings

CHECKPOINT_FORMAT = "metaseq2seq-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, payload: dict) -> None:
    """Temp file, fsync, rename: a kill never leaves a partial file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                                 **payload}, f))


@contextlib.contextmanager
def claim_checkpoint(path: Path):
    """Hold the lock `.<name>.lock` beside the checkpoint `path` for a whole run, so that a second train on the
    same checkpoint fails at once instead of writing it (and its metrics log) too. The OS drops the lock when
    its holder dies. The checkpoint's directory is made here when missing, and removed again when the run
    fails before anything but the lock was written into it."""
    path = Path(path)
    made = _missing_dirs(path.parent)
    check_writable_dir(path.parent, "--dir_model")
    lock_file = path.parent / f".{path.name}.lock"
    busy = (f"another train is writing {path} (it holds {lock_file}): wait for it to end, or give another "
            "--dir_model or --fn_out_model")
    try:
        with exclusive(lock_file, busy):
            yield
    except BaseException:
        _remove_if_unused(made, lock_file)
        raise


def _missing_dirs(directory: Path) -> list[Path]:
    """`directory` and its ancestors that do not exist yet, deepest first."""
    missing, directory = [], Path(directory).absolute()
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    return missing


def _remove_if_unused(made: list[Path], lock_file: Path) -> None:
    """Remove the directories this run made, if nothing but its lock file went into them."""
    if not made or any(p != lock_file for p in lock_file.parent.iterdir()):
        return
    lock_file.unlink(missing_ok=True)
    for directory in made:
        try:
            directory.rmdir()
        except OSError:  # something else appeared in it meanwhile: leave it
            return


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a metaseq2seq checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {path} has version {payload.get('version')}, expected {CHECKPOINT_VERSION}")
    return upgrade_configs(payload)


def upgrade_configs(payload: dict) -> dict:
    """The payload with its configs in today's settings: what an older checkpoint was trained with is stated
    under today's names, here, once (trainer/config.py's upgrade_settings)."""
    from trainer.model import ModelConfig  # here: the model module imports this one's callers
    model_names = {f.name for f in fields(ModelConfig)}
    return {**payload, "train_config": upgrade_settings(payload["train_config"], SETTINGS),
            "model_config": upgrade_settings(payload["model_config"], model_names)}
