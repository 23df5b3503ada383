"""The Python API, for notebooks and scripts: `from evalsuite import api` (docs/api.md).

Load a checkpoint (ours, or the original code's `net_T.tar`), predict against a support set of one's own with
both attentions as arrays, evaluate a split, train from a config object, open a store as a `datasets`
dataset. No click, and nothing is written unless asked: `train` writes its run, `evaluate` a report only when
given `out`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evalsuite.decode import decode_shared_support, query_attention
from evalsuite.evaluate import EvalConfig, Loaded, evaluate as evaluate_checkpoint, load_model
from pipeline.store import GenerateConfig, generate as generate_store
from trainer.config import TrainConfig
from evalsuite.original_checkpoint import load_any_checkpoint
from trainer.train import train as train_run

__all__ = ["Loaded", "Prediction", "GenerateConfig", "TrainConfig", "load", "predict", "evaluate", "train",
           "generate", "open_store"]


@dataclass
class Prediction:
    command: str
    output: str                            # the greedy output, without EOS
    memory_attention: np.ndarray | None    # (input tokens + EOS, support items); None without memory
    decoder_attention: np.ndarray | None   # (output tokens + EOS, input tokens + EOS); None without attention


def load(checkpoint: str | Path, device: str = "cpu") -> Loaded:
    """A checkpoint's model, in eval mode, with its vocabularies (`.tokenizer`) and its saved data (`.checkpoint`)."""
    return load_model(load_any_checkpoint(Path(checkpoint)), EvalConfig(checkpoint=str(checkpoint), device=device))


def predict(model: Loaded, support: list[tuple[str, str]], commands: list[str],
            attention: bool = True) -> list[Prediction]:
    """Each command's greedy output against `support` [(input, output), ...], the commands one episode, as
    `predict` and `eval --scan_file` decode them; with `attention`, where the model looked while writing it."""
    tokens = model.tokenizer
    outputs = decode_shared_support(model.model, tokens.encode_pairs(support),
                                    [tokens.encode_input(c) for c in commands], model.max_length, model.device)
    predictions = []
    for command, ids in zip(commands, outputs):
        found = query_attention(model.model, tokens, support, command, model.max_length, model.device,
                                commands) if attention else None
        predictions.append(Prediction(command, tokens.decode_output(ids),
                                      _array(found.memory) if found else None,
                                      _array(found.decoder) if found else None))
    return predictions


def _array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy()


def evaluate(checkpoint: str | Path, split: str | None = None, out: str | Path | None = None,
             device: str = "cpu", **options) -> dict:
    """{split: scores} of the checkpoint, as `eval` scores them (its validation episodes and its SCAN test
    split, or `split`); a report directory is written only when `out` is given. `options` are EvalConfig's."""
    cfg = EvalConfig(checkpoint=str(checkpoint), split=split, out=None if out is None else str(out),
                     device=device, write_report=out is not None, **options)
    return evaluate_checkpoint(cfg)["splits"]


def train(cfg: TrainConfig) -> dict:
    """Train as `train` does (the store generated first if it is missing); returns the last validation scores
    and where the checkpoint went."""
    return train_run(cfg)


def generate(cfg: GenerateConfig) -> Path:
    """Generate an episode store, as `generate` does; returns its directory."""
    return generate_store(cfg)


def open_store(store: str | Path):
    """The store as a `datasets.DatasetDict` (train and validation), read offline from its shards."""
    import datasets  # here: it takes seconds to import
    return datasets.load_dataset(str(store))
