"""Checkpoints are plain data (tensors, numbers, strings, lists, dicts), loaded with weights_only=True.

Layout: format, version, episode_type, model_config, train_config, model, optimizer, scheduler,
input_vocab, output_vocab, episodes_done, data_position, store, manifest_sha256, rng, val.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.shardio import write_atomically

CHECKPOINT_FORMAT = "metaseq2seq-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, payload: dict) -> None:
    """Temp file, fsync, rename: a kill never leaves a partial file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                                 **payload}, f))


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
    return payload
