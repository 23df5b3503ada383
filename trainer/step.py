"""One optimizer step of a run's M models (a single run is M = 1), and their validation."""
from __future__ import annotations

import torch

from trainer.config import TrainConfig
from trainer.data import Tokenizer
from trainer.evaluate import decode_each_models_records
from trainer.metrics import score_episodes
from trainer.model import MetaSeq2Seq, clip_grad_norms_
from trainer.state import TrainState, count_step

VAL_KEYS = ("accuracy", "retrieval", "generalization", "n_episodes")


def train_step(state: TrainState, loss_module, batch, cfg: TrainConfig,
               episodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of every model on `batch`, `episodes` each (over all processes); `loss_module(batch)`
    gives the M losses (the model's loss, or the module that wraps it). Returns the M losses and the M gradient
    norms before the clip, on the CPU."""
    autocast = torch.autocast(batch.query_in.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    with autocast:
        losses = loss_module(batch)                                         # (M,)
    state.optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()  # the models share no weight: each gets the gradient of its own loss
    norms = clip_grad_norms_(state.model, cfg.clip)
    state.optimizer.step()
    count_step(state, cfg, episodes)
    return losses.detach().cpu(), norms.detach().cpu()


def mean_per_model(rows: list[torch.Tensor]) -> list[float]:
    """Steps' (M,) values -> each model's mean, summed in Python floats."""
    return [sum(column) / len(column) for column in torch.stack(rows).t().tolist()]


def validate(model: MetaSeq2Seq, records: list[list[dict]], tokenizer: Tokenizer, cfg: TrainConfig,
             device: torch.device) -> list[dict]:
    """Each model's validation scores on its own episodes, all models decoded together."""
    results = decode_each_models_records(model, records, tokenizer, cfg.max_length_eval, device)
    return [{k: s[k] for k in VAL_KEYS} for s in map(score_episodes, results)]
