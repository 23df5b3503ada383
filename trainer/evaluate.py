"""Greedy decoding of whole episodes, scored query by query. Shared by training validation and `cli.py eval`,
so the two always agree on the same checkpoint."""
from __future__ import annotations

import torch

from trainer.data import Tokenizer, collate_episodes
from trainer.metrics import QueryResult
from trainer.model import MetaSeq2Seq, evaluating, strip_decoded


def episode_queries(record: dict, support_as_queries: bool) -> list[dict]:
    return record["query"] + (record["support"] if support_as_queries else [])


@torch.no_grad()
def decode_records(model: MetaSeq2Seq, records: list[dict], tokenizer: Tokenizer, max_length: int,
                   device: torch.device, episodes_per_batch: int = 16) -> list[list[QueryResult]]:
    """Each record's queries, then its support items as queries (retrieval), decoded greedily."""
    results = []
    with evaluating(model):
        for start in range(0, len(records), episodes_per_batch):
            chunk = records[start:start + episodes_per_batch]
            batch = collate_episodes(chunk, tokenizer, support_as_queries=True).to(device)
            predictions = strip_decoded(model.greedy_decode(batch, max_length))
            for record, episode_predictions in zip(chunk, predictions):
                results.append(score_record(record, episode_predictions, tokenizer))
    return results


def score_record(record: dict, predictions: list[list[int]], tokenizer: Tokenizer) -> list[QueryResult]:
    support_inputs = {s["input"] for s in record["support"]}
    queries = episode_queries(record, support_as_queries=True)
    return [QueryResult(q["input"], q["output"], tokenizer.decode_output(p), q["input"] in support_inputs)
            for q, p in zip(queries, predictions)]
