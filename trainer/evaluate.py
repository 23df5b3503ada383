"""Greedy decoding of whole episodes, scored query by query. Shared by training validation and `cli.py eval`,
so the two always agree on the same checkpoint."""
from __future__ import annotations

import torch

from pipeline.errors import UserError
from trainer.data import Tokenizer, collate_episodes
from trainer.metrics import QueryResult
from trainer.model import MetaSeq2Seq, evaluating, strip_decoded


def episode_queries(record: dict, support_as_queries: bool) -> list[dict]:
    return record["query"] + (record["support"] if support_as_queries else [])


def decode_records(model: MetaSeq2Seq, records: list[dict], tokenizer: Tokenizer, max_length: int,
                   device: torch.device, episodes_per_batch: int = 16) -> list[list[QueryResult]]:
    """Each record's queries, then its support items as queries (retrieval), decoded greedily."""
    return decode_each_models_records(model, [records], tokenizer, max_length, device, episodes_per_batch)[0]


@torch.no_grad()
def decode_each_models_records(model: MetaSeq2Seq, records: list[list[dict]], tokenizer: Tokenizer,
                               max_length: int, device: torch.device,
                               episodes_per_batch: int = 16) -> list[list[list[QueryResult]]]:
    """decode_records for each of the model's M models on its own records (as many for each), decoded together."""
    count = len(records[0])
    if any(len(r) != count for r in records):
        raise UserError("the stores of a stack hold different numbers of validation episodes")
    results = [[] for _ in records]
    with evaluating(model):
        for start in range(0, count, episodes_per_batch):
            chunks = [r[start:start + episodes_per_batch] for r in records]
            batch = collate_episodes([r for chunk in chunks for r in chunk], tokenizer, True).to(device)
            predictions = strip_decoded(model.greedy_decode(batch, max_length))
            k = len(chunks[0])
            for m, chunk in enumerate(chunks):
                results[m] += [score_record(r, p, tokenizer) for r, p in zip(chunk, predictions[m * k:(m + 1) * k])]
    return results


def score_record(record: dict, predictions: list[list[int]], tokenizer: Tokenizer) -> list[QueryResult]:
    support_inputs = {s["input"] for s in record["support"]}
    queries = episode_queries(record, support_as_queries=True)
    return [QueryResult(q["input"], q["output"], tokenizer.decode_output(p), q["input"] in support_inputs)
            for q, p in zip(queries, predictions)]
